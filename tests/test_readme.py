"""The README's "Your first runs" commands, in the order written, in a fresh folder, with tiny step counts.

Each command must exit 0 and use the checkpoint it should: validate and generate the run's own
last.ckpt, the override run its own folder, and `--ckpt_path last` the newest last*.ckpt of run
"tiny" although the 6-layer run "tiny_6l" wrote a newer one.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flm_lightning.__main__ import main as tool_main
from flm_lightning.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Your first runs\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_readme_commands_in_order(docs_cache, tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    assert [c.split()[:4] for c in commands] == [
        ["python", "main.py", "fit", "-c"],
        ["python", "main.py", "validate", "-c"],
        ["python", "main.py", "fit", "-c"],
        ["python", "main.py", "fit", "-c"],
        ["python", "-m", "flm_lightning", "generate"],
        ["python", "-m", "flm_lightning", "export-hf"],
        ["tensorboard", "--logdir", "runs"],
    ]
    (tmp_path / "conf").symlink_to(REPO / "conf")
    monkeypatch.chdir(tmp_path)
    tiny = [
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--data.batch_size=4",
        f"--data.cache_dir={docs_cache}",
    ]
    extra = [  # appended to each command: later values win
        [*tiny, "--trainer.max_steps=4"],
        [*tiny],
        [*tiny, "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"],
        [*tiny, "--trainer.max_steps=6", "--trainer.enable_progress_bar=false"],
        ["--max-new-tokens=4"],
        [],
    ]
    runs = tmp_path / "runs"
    results = []
    for command, more in zip(commands, extra):
        argv = shlex.split(command)
        if argv[:2] == ["python", "main.py"]:
            results.append(cli_main(argv[2:] + more))  # a SystemExit here is the command failing
        else:
            tool_main(argv[3:] + more)
            results.append(None)
    fit, validate, override, resume = results[:4]
    out = capsys.readouterr()

    # 1. fit: run "tiny" in runs/tiny, checkpoint at step 4, and the end-of-run lines.
    assert fit.trainer.global_step == 4
    tiny_last = runs / "tiny" / "checkpoints" / "last.ckpt"
    assert "checkpoint: runs/tiny/checkpoints/last.ckpt\nTensorBoard: tensorboard --logdir runs/tiny" in out.out
    # 2. validate: that checkpoint, logged as its own run at the step fit logged the same validation.
    assert Path(validate.trainer.ckpt_path).resolve() == tiny_last.resolve()
    trained = _events(runs / "tiny" / "version_0").Scalars("val/loss")[-1]
    validated = _events(runs / "tiny" / "validate_step4").Scalars("val/loss")
    assert [e.step for e in validated] == [trained.step] == [3]
    assert validated[0].value == pytest.approx(trained.value, abs=1e-5)
    # 3. the override run lives in its own folder, 6 layers.
    six = torch.load(runs / "tiny_6l" / "checkpoints" / "last.ckpt", weights_only=True)
    assert six["hyper_parameters"]["arch"]["n_layers"] == 6 and six["global_step"] == 2
    # 4. `--ckpt_path last` resumes run "tiny" (4 layers, step 4), not the newer tiny_6l checkpoint.
    assert Path(resume.trainer.ckpt_path).resolve() == tiny_last.resolve()
    assert resume.model.arch.n_layers == 4 and resume.trainer.global_step == 6
    assert "resuming runs/tiny/checkpoints/last.ckpt" in out.err
    folders = sorted(p.name for p in (runs / "tiny").iterdir())
    assert folders == ["checkpoints", "validate_step4", "version_0", "version_1"]
    # 5. generate reads the resumed run's newest state; 6. export-hf writes a 4-layer model.
    assert "runs/tiny/checkpoints/last.ckpt: step 6" in out.err
    config = json.loads((tmp_path / "hf" / "tiny" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert sorted(p.name for p in runs.iterdir()) == ["tiny", "tiny_6l"]
