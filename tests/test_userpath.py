"""The exact lines a user sees on the README's path: unknown keys, YAML errors, a used checkpoint folder,
an architecture mismatch, `last` choosing within the run name, no empty log folder after a failed start,
and `--help` without heavy imports."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flm_lightning.__main__ import TOOLS, load_tool
from flm_lightning.cli import main, resolve_last
from flm_lightning.console import quiet_third_party, summarize_unknown_key, yaml_syntax_error
from tests.conftest import TINY

FAST = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--data.batch_size=4",
    "--model.arch.n_layers=1",
]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.arch.n_layer=6"], "error: unknown key model.arch.n_layer (did you mean n_layers?)"),
        (["--model.optim.lrr=1"], "error: unknown key model.optim.lrr (did you mean lr?)"),
        (["--data.batch_sise=3"], "error: unknown key data.batch_sise (did you mean batch_size?)"),
        (["--trainer.max_step=50"], "error: unknown key trainer.max_step (did you mean max_steps?)"),  # no abbreviation
        (["--ckpt_pth=last"], "error: unknown key ckpt_pth (did you mean ckpt_path?)"),
    ],
)
def test_unknown_keys_on_the_command_line(extra, expected, capsys):
    assert _error(capsys, ["fit", "-c", TINY, *extra]) == expected


def test_unknown_key_and_syntax_error_in_yaml(tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text("model:\n  arch:\n    n_layer: 6\n")
    assert (
        _error(capsys, ["fit", "-c", TINY, "-c", str(tmp_path / "typo.yaml")])
        == "error: unknown key model.arch.n_layer (did you mean n_layers?)"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch:\n    n_layers: 6\n   hidden_size: 64\n")
    assert _error(capsys, ["fit", "-c", TINY, "-c", str(bad)]) == (
        f"error: {bad}:4:4: invalid YAML: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping)"
    )
    assert yaml_syntax_error(str(tmp_path / "typo.yaml")) is None


def test_suggestion_only_when_close():
    message = "unrecognized arguments: --trainer.zzz=1"
    assert summarize_unknown_key(message, {"trainer": None}) == "unknown key trainer.zzz"


def test_last_chooses_within_the_run_name(tmp_path):
    for name, age in (("tiny", 100), ("tiny_6l", 0)):  # tiny_6l holds the newest file of all
        folder = tmp_path / name / "checkpoints"
        folder.mkdir(parents=True)
        for file, extra_age in (("last.ckpt", 10), ("last-v1.ckpt", 0), ("step=4.ckpt", -50)):
            (folder / file).write_bytes(b"x")
            stamp = time.time() - age - extra_age
            os.utime(folder / file, (stamp, stamp))
    assert resolve_last(tmp_path / "tiny" / "checkpoints") == tmp_path / "tiny" / "checkpoints" / "last-v1.ckpt"
    assert resolve_last(tmp_path / "other" / "checkpoints") is None


def test_used_folder_mismatch_and_failed_start(docs_cache, tmp_path, capsys):
    common = ["fit", "-c", TINY, f"--data.cache_dir={docs_cache}", f"--trainer.default_root_dir={tmp_path}", *FAST]
    first = main(common + ["--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    assert first.trainer.global_step == 2
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["checkpoints", "version_0"]
    capsys.readouterr()
    # A new run into the same name: refused, nothing written.
    assert _error(capsys, common + ["--trainer.max_steps=4"]) == (
        f"error: {tmp_path}/tiny/checkpoints already holds the checkpoints of an earlier run (1 file; newest "
        "last.ckpt at step 2): resume it with --ckpt_path last, or start a new run with "
        "--trainer.logger.init_args.name=NEW_NAME"
    )
    # Resuming with another architecture: the file and both values, from `last` and from the file itself.
    expected = "model.arch differs from the config's: n_layers is 1 in the checkpoint, 2 in the config"
    assert _error(capsys, common + ["--ckpt_path=last", "--model.arch.n_layers=2"]) == f"error: {ckpt}: {expected}"
    assert _error(capsys, common + [f"--ckpt_path={ckpt}", "--model.arch.n_layers=2"]) == f"error: {ckpt}: {expected}"
    # A start that fails in setup (vocabulary smaller than the tokenizer's) leaves no empty version folder.
    assert _error(capsys, common + ["--trainer.logger.init_args.name=v", "--model.arch.vocab_size=1000"]).startswith(
        "error: model.arch.vocab_size (1000) is smaller than the tokenizer's vocabulary"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["checkpoints", "version_0"]


def test_help_imports_no_heavy_library():
    code = (
        "import sys\nfrom flm_lightning.__main__ import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
        "    pass\nprint(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]"


def test_tool_help_lines_match_their_docstrings():
    for name, (_, line) in TOOLS.items():
        assert (load_tool(name).__doc__ or "").splitlines()[0] == line, name


def test_advertisement_is_dropped(caplog):
    import logging

    quiet_third_party()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
