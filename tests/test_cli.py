"""End to end through LightningCLI: fit, TensorBoard, checkpoint, validate, bad configs."""

import glob
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flm_lightning.cli import main
from tests.conftest import TINY

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _common(cache, tmp):
    return [
        "-c",
        TINY,
        f"--data.cache_dir={cache}",
        f"--trainer.logger.init_args.save_dir={tmp}",
        "--trainer.limit_val_batches=4",
        *QUIET,
    ]


@pytest.fixture(scope="module")
def tiny_run(docs_cache, tmp_path_factory):
    """30 steps of the tiny config with validation every 15 steps."""
    tmp = tmp_path_factory.mktemp("run")
    cli = main(
        [
            "fit",
            *_common(docs_cache, tmp),
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=15",
            "--model.optim.warmup_steps=5",
            "--trainer.log_every_n_steps=1",
        ]
    )
    events = glob.glob(f"{tmp}/tiny/version_0/events.out.tfevents.*")
    assert len(events) == 1
    acc = EventAccumulator(events[0], size_guidance={"tensors": 0})
    acc.Reload()
    return cli, acc, tmp


def test_fit_logs_everything_to_tensorboard(tiny_run):
    _, acc, _ = tiny_run
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/ppl",
        "train/lm_loss",
        "train/grad_norm",
        "val/loss",
        "val/ppl",
        "train/lr",
        "throughput/tokens_per_sec",
        "throughput/tflops",
    ):
        assert tag in tags, tag
    # One LR curve (AdamW's decay / no_decay groups share it) and no epoch counter in a step-based run.
    assert not any(t.startswith("lr-") or t.startswith("train/lr/") or t == "epoch" for t in tags), sorted(tags)
    facts = acc.Tensors("run/facts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| parameters | 1,377,408 |" in facts and "| training FLOPs per token (sequence 128) | 7,471,104 |" in facts
    assert "n_layers: 4" in acc.Tensors("run/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert acc.Scalars("throughput/tokens_per_sec")[-1].value > 0
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(3e-3 / 5) and max(lrs) == pytest.approx(3e-3) == lrs[4]  # warmup
    assert lrs[-1] < lrs[10] < lrs[5]  # cosine decay


def test_fit_learns(tiny_run):
    _, acc, _ = tiny_run
    train = [e.value for e in acc.Scalars("train/loss")]
    val = [e.value for e in acc.Scalars("val/loss")]
    assert len(val) == 2
    assert train[0] > 7.0  # about ln(2048) = 7.62 at initialisation
    assert val[-1] < val[0] < train[0]
    ppl = acc.Scalars("val/ppl")[-1].value
    assert ppl == pytest.approx(2.718281828 ** val[-1], rel=1e-4)


def test_validate_reproduces_last_val_loss(tiny_run, docs_cache):
    cli, acc, tmp = tiny_run
    ckpts = glob.glob(f"{tmp}/tiny/checkpoints/last.ckpt")
    assert ckpts
    again = main(["validate", *_common(docs_cache, tmp), "--trainer.logger=false", f"--ckpt_path={ckpts[0]}"])
    assert again.trainer.callback_metrics["val/loss"].item() == pytest.approx(
        acc.Scalars("val/loss")[-1].value, abs=1e-6
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.arch.hidden_size=130", "model.arch.hidden_size (130) is not divisible by model.arch.n_heads"),
        ("--model.arch.norm=batchnorm", "model.arch.norm must be one of"),
        ("--model.arch.activation=relu", "model.arch.activation must be one of"),
        ("--model.arch.n_layers=-2", "model.arch.n_layers must be a positive integer"),
        ("--model.arch.n_heads=four", "model.arch.n_heads: expected"),
        (
            "--model.arch.vocab_size=1000",
            "model.arch.vocab_size (1000) is smaller than the tokenizer's vocabulary (2048)",
        ),
        ("--model.optim.lr=-1", "model.optim.lr must be > 0"),
        ("--data.batch_size=0", "data.batch_size must be a positive integer"),
        ("--trainer.max_stepz=3", "unknown key trainer.max_stepz (did you mean max_steps?)"),
        ("--trainer.precision=17", "trainer.precision: invalid value"),
    ],
)
def test_bad_config_exits_2_with_one_line(override, expected, docs_cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_common(docs_cache, tmp_path), "--trainer.max_steps=1", "--trainer.logger=false", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1]
    assert not any("Traceback" in line for line in err)


def test_bad_config_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(TINY).read().replace("n_heads: 4", "n_heads: 3"))
    out = subprocess.run([sys.executable, "main.py", "fit", "-c", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: model.arch.hidden_size (128) is not divisible")
    assert "Traceback" not in out.stderr


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_bf16_mixed_fit_runs(docs_cache, tmp_path):
    cli = main(
        [
            "fit",
            *_common(docs_cache, tmp_path),
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=null",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            "--trainer.precision=bf16-mixed",
        ]
    )
    loss = cli.trainer.callback_metrics["train/loss"].item()
    assert cli.trainer.global_step == 3 and 6.0 < loss < 8.0
