"""Every tool that takes -c reads its config as `main.py fit` does (flm_lightning.cli.load_config): several -c
overlays, --set overrides, the LightningModule's normalisation, main.py's one-line errors with exit status 2."""

import json

import pytest

from flm_lightning.__main__ import main as tool_main
from flm_lightning.cli import load_config
from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig, count_model

BASE = """
model:
  arch: {vocab_size: 512, n_layers: 4, n_heads: 4, hidden_size: 64, max_seq_len: 64}
  mup: {base_hidden_size: 32}
  optim: {lr: 0.01}
data:
  class_path: flm_lightning.data.TextDataModule
  init_args: {vocab_size: 512, seq_len: 32, batch_size: 4}
"""
OVERLAY = """
model:
  arch: {n_layers: 6}
  optim: {lr: 0.02}
data:
  init_args: {seq_len: 48}
"""


@pytest.fixture
def configs(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "overlay.yaml").write_text(OVERLAY)
    return [str(tmp_path / "base.yaml"), str(tmp_path / "overlay.yaml")]


# base + overlay + --set model.arch.hidden_size=128: n_layers 6 from the overlay, hidden 128 from the override,
# heads 4 and vocabulary 512 from the base, base_hidden_size 32 copied from model.mup by the LightningModule.
MERGED = ModelConfig(vocab_size=512, n_layers=6, n_heads=4, hidden_size=128, max_seq_len=64, base_hidden_size=32)


def test_load_config_merges_overlays_and_overrides_and_normalises(configs):
    config = load_config(configs, ["model.arch.hidden_size=128", "--data.init_args.batch_size=8"])
    assert config.arch == MERGED
    assert (config.arch.n_layers, config.arch.hidden_size, config.arch.base_hidden_size) == (6, 128, 32)
    assert config.model.optim_cfg.lr == 0.02 and config.model.mup_cfg.base_hidden_size == 32
    assert config.seq_len == 48
    data = config.values["data"]["init_args"]
    assert (data["vocab_size"], data["seq_len"], data["batch_size"]) == (512, 48, 8)
    assert config.values["trainer"]["max_steps"] == -1  # every key present, Lightning's defaults filled in


def test_info_sees_the_merged_normalised_config(configs, capsys):
    tool_main(["info", "-c", configs[0], "-c", configs[1], "--set", "model.arch.hidden_size=128", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == f"{configs[0]} + {configs[1]}"
    assert report["arch"]["n_layers"] == 6 and report["arch"]["hidden_size"] == 128
    assert report["arch"]["n_heads"] == 4 and report["arch"]["base_hidden_size"] == 32
    # By hand: untied 512 x 128 embedding and head, 6 x (2 norms, 4 attention 128 x 128, SwiGLU 3 x 128 x 384:
    # 8/3 x 128 rounded up to 64), final norm.
    assert report["parameters"] == 2 * 512 * 128 + 6 * (2 * 128 + 4 * 128 * 128 + 3 * 128 * 384) + 128 == 1_410_688
    assert report["parameters"] == count_model(MERGED).parameters
    assert report["seq_len"] == 48  # data.seq_len of the overlay


def test_plan_sees_the_merged_config(configs, capsys):
    tool_main(
        [
            "plan",
            "-c",
            configs[0],
            "-c",
            configs[1],
            "--set",
            "model.arch.hidden_size=128",
            "--gpus",
            "1",
            "--tp",
            "1",
            "--pp",
            "1",
            "--global-batch",
            "8",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 1_410_688
    assert report["flops_per_token"] == count_model(MERGED, 48).flops_per_token


def test_predict_loss_target_overlays(configs, tmp_path, capsys):
    rows = ["params,loss"] + [f"{n},{50 * n**-0.25 + 2.0}" for n in (1e4, 3e4, 1e5, 3e5)]
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    tool_main(
        [
            "predict-loss",
            "--csv",
            str(tmp_path / "runs.csv"),
            "--target",
            configs[0],
            "--target",
            configs[1],
            "--out",
            str(tmp_path / "out"),
        ]
    )
    result = json.loads((tmp_path / "out" / "predict_loss.json").read_text())
    six_layers = ModelConfig(vocab_size=512, n_layers=6, n_heads=4, hidden_size=64, max_seq_len=64)
    assert result["target_params"] == count_model(six_layers).non_embedding_parameters


@pytest.mark.parametrize(
    "tool",
    [
        ["info"],
        ["plan", "--gpus", "1"],
        ["bench"],
        ["coord-check"],
        ["grow", "--ckpt", "none.ckpt", "--out", "{tmp}/out.ckpt"],
        ["predict-loss", "--sweep", "--out", "{tmp}/pl"],
        ["compare-layouts", "--layouts", "1x1x1"],
    ],
)
def test_a_bad_key_is_one_line_and_exit_2_in_every_tool(tool, configs, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in tool] + [
        "-c",
        configs[0],
        "-c",
        configs[1],
        "--set",
        "model.arch.n_layer=6",
    ]
    with pytest.raises(SystemExit) as exit_info:
        tool_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: unknown key model.arch.n_layer (did you mean n_layers?)"
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize(
    "configs_, overrides, message",
    [
        (["{tmp}/nope.yaml"], [], "config file {tmp}/nope.yaml does not exist"),
        (["{tmp}/base.yaml"], ["model.compile"], "--set expects KEY=VALUE, got 'model.compile'"),
        (
            ["{tmp}/base.yaml"],
            ["model.arch.n_heads=3"],
            "model.arch.hidden_size (64) is not divisible by model.arch.n_heads (3)",
        ),
        (["{tmp}/base.yaml"], ["trainer.precision=17"], "trainer.precision: invalid value '17'"),
        (
            ["{tmp}/base.yaml"],
            ["model.arch.base_hidden_size=16"],
            "model.arch.base_hidden_size (16) must equal model.mup.base_hidden_size (32)",
        ),
    ],
)
def test_load_config_errors_are_main_py_lines(configs_, overrides, message, configs, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config([c.format(tmp=tmp_path) for c in configs_], overrides)
    assert str(info.value).startswith(message.format(tmp=tmp_path))
