"""μP experiments: the coordinate check's slopes, the power-law fitter and predict-loss's inputs."""

import json

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from flm_lightning.__main__ import main as tool_main
from flm_lightning.model import count_model
from flm_lightning.mup import MuPConfig
from flm_lightning.mup_experiments import at_width, coord_check, fit_power_law
from tests.conftest import tiny_config


def test_coord_check_flat_under_mup_growing_under_sp():
    arch = tiny_config("teleflm", vocab_size=256, hidden_size=32, n_heads=2, head_dim=16)
    result = coord_check(
        arch, MuPConfig(base_hidden_size=32), lr=1e-2, widths=[32, 64, 128, 256], steps=3, batch_size=2, seq_len=16
    )
    mup, sp = result["mup"]["slopes"], result["sp"]["slopes"]
    assert set(mup) == {"embedding", "block.0", "block.1", "logits"}
    # Measured (4 widths, 3 steps): μP |slope| <= 0.03 everywhere; SP blocks +2.2, logits +0.94.
    assert all(abs(s) < 0.35 for s in mup.values()), mup
    assert sp["block.0"] > 1.2 and sp["block.1"] > 1.2 and sp["logits"] > 0.7, sp
    assert abs(sp["embedding"]) < 0.35  # Adam moves embedding coordinates by O(lr) at any width
    # Heads scale, head_dim stays.
    assert at_width(arch, 256).n_heads == 16 and at_width(arch, 256).head_size == 16


def test_coord_check_command_writes_png_and_json(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {arch: {vocab_size: 128, n_layers: 1, n_heads: 2, hidden_size: 32, max_seq_len: 16}, "
        "mup: {base_hidden_size: 32}, optim: {lr: 0.01}}"
    )
    tool_main(
        [
            "coord-check",
            "-c",
            str(config),
            "--widths",
            "32,64",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    summary = json.loads((tmp_path / "out" / "coord_check.json").read_text())
    assert summary["widths"] == [32, 64] and len(summary["sp"]["scales"]["64"]) == 2  # steps 0 and 1
    assert (tmp_path / "out" / "coord_check.png").stat().st_size > 10_000
    assert "logits" in capsys.readouterr().out


def test_fitter_recovers_known_constants():
    n = np.geomspace(1e5, 1e7, 6)
    a, b, c = fit_power_law(n, 400 * n**-0.3 + 1.7)
    assert (
        a == pytest.approx(400, rel=1e-3) and b == pytest.approx(-0.3, rel=1e-4) and c == pytest.approx(1.7, abs=1e-4)
    )
    noisy = 400 * n**-0.3 + 1.7 + np.random.default_rng(0).normal(0, 0.002, n.size)
    a, b, c = fit_power_law(n[:5], noisy[:5])
    assert a * 1e7**b + c == pytest.approx(400 * 1e7**-0.3 + 1.7, rel=0.01)


def _law(n):
    return 50 * n**-0.25 + 2.0


def test_predict_from_csv_with_steps(tmp_path, capsys):
    rows = ["params,step,loss"] + [
        f"{n},{s},{_law(n) + (1.0 if s == 10 else 0.0)}" for n in (1e4, 3e4, 1e5, 3e5) for s in (10, 20)
    ]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    tool_main(
        [
            "predict-loss",
            "--csv",
            str(tmp_path / "runs.csv"),
            "--target-params",
            "1e6",
            "--actual",
            str(_law(1e6)),
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "predict_loss.json").read_text())
    assert result["step"] == 20 and abs(result["error_pct"]) < 0.1
    assert result["b"] == pytest.approx(-0.25, rel=1e-3)
    assert (tmp_path / "predict_loss.png").is_file() and "error" in capsys.readouterr().out


def _tensorboard_runs(root, sizes, tag="val/loss"):
    for n in sizes:
        with SummaryWriter(str(root / f"run{int(n)}")) as writer:
            writer.add_scalar("model/non_embedding_parameters", n, 0)
            for step in (49, 99):
                writer.add_scalar(tag, _law(n) + (0.5 if step == 49 else 0.0), step)


def test_predict_from_tensorboard_runs_holding_out_the_largest(tmp_path):
    _tensorboard_runs(tmp_path / "logs", (1e4, 3e4, 1e5, 3e5, 1e6))
    tool_main(["predict-loss", "--runs", str(tmp_path / "logs"), "--holdout", "1", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "predict_loss.json").read_text())
    assert result["step"] == 99 and result["target_params"] == 1e6
    assert result["actual"] == pytest.approx(_law(1e6), rel=1e-6) and abs(result["error_pct"]) < 0.1
    assert [p["used"] for p in result["points"] if "used" in p] == [False]
    tool_main(
        [
            "predict-loss",
            "--runs",
            str(tmp_path / "logs"),
            "--at-step",
            "49",
            "--target-params",
            "1e6",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert json.loads((tmp_path / "out" / "predict_loss.json").read_text())["prediction"] == pytest.approx(
        _law(1e6) + 0.5, rel=1e-3
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tag", "train/loss"], "has no scalar 'train/loss'"),
        (["--at-step", "7"], "has no 'val/loss' at step 7"),
        (["--holdout", "2"], "needs at least 4 runs, got 2"),
    ],
)
def test_predict_from_runs_bad_input(tmp_path, capsys, args, message):
    _tensorboard_runs(tmp_path / "logs", (1e4, 3e4, 1e5, 3e5))
    extra = [] if args[0] == "--holdout" else ["--target-params", "1e6"]
    with pytest.raises(SystemExit) as exit_info:
        tool_main(["predict-loss", "--runs", str(tmp_path / "logs"), *args, *extra, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sweep_trains_each_width_with_the_trainer_and_reuses_finished_runs(tmp_path, capsys):
    from flm_lightning.cli import load_config
    from flm_lightning.data import prepare
    from flm_lightning.tools.predict_loss import read_runs, sweep

    (tmp_path / "text").mkdir()
    for i in range(30):
        (tmp_path / "text" / f"{i}.txt").write_text(f"Document {i} about foxes and dogs. " * 20)
    prepare([str(tmp_path / "text")], str(tmp_path / "data"), vocab_size=400, val_fraction=0.1, progress=False)
    config = tmp_path / "sweep.yaml"
    config.write_text(
        json.dumps(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "max_steps": 2,
                    "val_check_interval": 2,
                    "check_val_every_n_epoch": None,
                    "limit_val_batches": 1,
                    "enable_checkpointing": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": {
                        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "unused", "default_hp_metric": False},
                    },
                },
                "model": {
                    "arch": {
                        "vocab_size": 400,
                        "n_layers": 1,
                        "n_heads": 1,
                        "head_dim": 16,
                        "hidden_size": 16,
                        "max_seq_len": 32,
                    },
                    "mup": {"base_hidden_size": 16},
                    "optim": {"lr": 0.01, "warmup_steps": 0},
                },
                "data": {
                    "class_path": "flm_lightning.data.MixtureDataModule",
                    "init_args": {"sources": [{"path": str(tmp_path / "data")}], "seq_len": 32, "batch_size": 2},
                },
            }
        )
    )
    dirs = sweep([str(config)], [16, 32], None, tmp_path / "out")
    assert [d.name for d in dirs] == ["width16", "width32"]
    points, step = read_runs([str(d) for d in dirs], "val/loss", None)
    arch = load_config([str(config)]).arch
    assert step == 1 and [p["params"] for p in points] == [
        count_model(at_width(arch, w)).non_embedding_parameters for w in (16, 32)
    ]  # the trainer's own log
    sweep([str(config)], [16, 32], None, tmp_path / "out")  # finished runs are read back, not retrained
    assert capsys.readouterr().err.count("reusing") == 2
