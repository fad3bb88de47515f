"""Model growth: function preservation, masks, optimizer state, LR policies, callback, offline tool."""

import glob
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from flm_lightning.callbacks import GrowthCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flm_lightning.cli import main
from flm_lightning.errors import ConfigError
from flm_lightning.growth import GrowthMasks, grow, layer_order, masked_norm, transfer_adam_state
from flm_lightning.model import FLMTransformer
from flm_lightning.module import FLMLightningModule
from flm_lightning.optim import OptimConfig, build_adamw, lr_at
from tests.conftest import TINY, tiny_config

GROWTHS = {
    "ffn": dict(ffn_hidden_size=256),
    "heads": dict(n_heads=6),
    "hidden": dict(hidden_size=48),
    "depth": dict(n_layers=4),
    "all-at-once": dict(hidden_size=64, n_heads=7, ffn_hidden_size=384, n_layers=5),
}


def _base(family):
    # head_dim fixed at 8 so heads can grow; a μP base width so the output multiplier changes with width.
    return tiny_config(family, head_dim=8, base_hidden_size=16 if family == "teleflm" else None, output_mult=0.5)


def _scramble_new_slices(grown, origin, old_model, scale=5.0):
    """Arbitrary, large values everywhere the old model has no say."""
    old = dict(old_model.named_parameters())
    with torch.no_grad():
        for name, p in grown.named_parameters():
            noise = torch.randn_like(p) * scale
            if origin[name] is None:
                p.copy_(noise)
                continue
            keep = torch.zeros_like(p, dtype=torch.bool)
            keep[tuple(slice(0, n) for n in old[origin[name]].shape)] = True
            p.copy_(torch.where(keep, p, noise))


@pytest.mark.parametrize("kind", sorted(GROWTHS))
@pytest.mark.parametrize("mode", ["stack", "interleave", "random"])
def test_growth_preserves_the_function(family, kind, mode):
    torch.manual_seed(0)
    old_cfg = _base(family)
    model = FLMTransformer(old_cfg).eval()
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        before = model(tokens)
    target = replace(old_cfg, **GROWTHS[kind])
    depth_mode, init = ("stack", "random") if mode == "random" else (mode, "copy")
    grown, origin, sources, plan = grow(model, target, mode=depth_mode, init=init, seed=1)
    _scramble_new_slices(grown, origin, model)
    GrowthMasks(grown, plan, m=0.0)
    with torch.no_grad():
        after = grown.eval()(tokens)
    assert grown.config.hidden_size == target.hidden_size and len(grown.layers) == target.n_layers
    rel = (after[..., :100] - before[..., :100]).abs().max() / before.abs().max()
    assert rel < 1e-5


def test_masks_at_one_equal_the_folded_model(family):
    torch.manual_seed(0)
    old_cfg = _base(family)
    model = FLMTransformer(old_cfg)
    grown, origin, _, plan = grow(model, replace(old_cfg, **GROWTHS["all-at-once"]))
    _scramble_new_slices(grown, origin, model, scale=0.05)
    tokens = torch.randint(0, 100, (2, 16))
    masks = GrowthMasks(grown, plan, m=0.5)
    with torch.no_grad():
        half = grown(tokens)
        masks.m = 1.0
        full = grown(tokens)
        masks.remove()
        folded = grown(tokens)
    torch.testing.assert_close(full, folded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(half, folded)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in grown.modules())


@pytest.mark.parametrize("norm_cls", [torch.nn.LayerNorm, torch.nn.RMSNorm])
def test_masked_norm(norm_cls):
    norm = norm_cls(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6)
    torch.testing.assert_close(masked_norm(norm, x, torch.ones(6)), norm(x))
    # With new coordinates masked out, the old ones see the statistics of the old width only.
    small = norm_cls(4, eps=1e-5)
    with torch.no_grad():
        small.weight.copy_(norm.weight[:4])
    c = torch.tensor([1.0, 1, 1, 1, 0, 0])
    out = masked_norm(norm, torch.cat([x[:, :4], torch.randn(3, 2) * 100], -1), c)
    torch.testing.assert_close(out[:, :4], small(x[:, :4]))
    assert out[:, 4:].abs().max() == 0


def test_layer_orders():
    assert layer_order(2, 4, "stack") == [0, 1, "copy:0", "copy:1"]
    assert layer_order(3, 5, "interleave") == [0, "copy:0", 1, "copy:1", 2]
    assert layer_order(2, 3, "stack", init="random") == [0, 1, "random"]
    assert layer_order(2, 3, order=[0, "copy:1", 1]) == [0, "copy:1", 1]
    for bad in ([1, 0, "copy:0"], [0, "copy:5", 1], [0, 1, "clone"], [0, 0, 1]):
        with pytest.raises(ConfigError):
            layer_order(2, 3, order=bad)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size=16), "cannot shrink hidden_size"),
        (dict(n_layers=1), "cannot shrink n_layers"),
        (dict(ffn_hidden_size=32), "cannot shrink ffn_hidden_size"),
        (dict(head_dim=16, n_heads=4), "keeps head_dim fixed"),
        (dict(norm="layernorm"), "may change only"),
        ({}, "nothing grows"),
    ],
)
def test_bad_growth_targets(change, message):
    model = FLMTransformer(_base("teleflm"))
    with pytest.raises(ConfigError, match=message):
        grow(model, replace(_base("teleflm"), **change))


def test_growing_during_a_ramp_is_refused_before_any_change():
    module = FLMLightningModule(arch=_base("teleflm"))
    module.configure_model()
    module.apply_growth(replace(module.arch, n_layers=3), ramp_steps=10)
    model, arch = module.model, module.arch
    with pytest.raises(ConfigError, match="still in progress"):
        module.apply_growth(replace(arch, n_layers=4))
    assert module.model is model and module.arch is arch and len(module.lr_events) == 1


def test_adam_state_moves_into_the_leading_block():
    torch.manual_seed(0)
    old_cfg = _base("teleflm")
    model = FLMTransformer(old_cfg)
    opt = build_adamw(model, OptimConfig())
    tokens = torch.randint(0, 100, (2, 8))
    for _ in range(3):
        model(tokens).sum().backward()
        opt.step()
        opt.zero_grad()
    grown, origin, _, _ = grow(model, replace(old_cfg, hidden_size=48, n_layers=3), init="random")
    for policy, new_layer_step in (("keep", 3.0), ("reset_new", 0.0)):
        new_opt = build_adamw(grown, OptimConfig())
        transfer_adam_state(opt, model, new_opt, grown, origin, policy)
        wq_old, wq_new = model.layers["0"].attention.wq.weight, grown.layers["0"].attention.wq.weight
        old_state, new_state = opt.state[wq_old], new_opt.state[wq_new]
        torch.testing.assert_close(new_state["exp_avg"][:, :32], old_state["exp_avg"])
        assert new_state["exp_avg"][:, 32:].abs().max() == 0 and new_state["exp_avg_sq"][:, 32:].abs().max() == 0
        assert float(new_state["step"]) == 3.0
        fresh = new_opt.state[grown.layers["2"].attention.wq.weight]
        assert float(fresh["step"]) == new_layer_step and fresh["exp_avg"].abs().max() == 0
        assert [g["weight_decay"] for g in new_opt.param_groups] == [0.1, 0.0]


def test_lr_policies_at_growth():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear")
    assert lr_at(50, cfg, 100, [{"step": 50, "policy": "continue"}]) == pytest.approx(0.5)
    rewarm = [{"step": 50, "policy": "rewarmup", "rewarmup_steps": 10}]
    assert lr_at(50, cfg, 100, rewarm) == pytest.approx(0.5 * 0.1)
    assert lr_at(60, cfg, 100, rewarm) == pytest.approx(0.4)  # back on the inherited schedule
    peak = [{"step": 50, "policy": "peak", "rewarmup_steps": 0}]
    assert lr_at(50, cfg, 100, peak) == pytest.approx(1.0)
    assert lr_at(75, cfg, 100, peak) == pytest.approx(0.5)  # decays again to min_lr at the end


GROWTH_YAML = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 8, save_last: false, save_top_k: -1}
    - class_path: flm_lightning.callbacks.GrowthCallback
      init_args:
        stages:
          - at_step: 6
            arch: {hidden_size: 192, n_heads: 6, ffn_hidden_size: 512}
            ramp_steps: 6
            rewarmup_steps: 3
          - at_step: 12
            arch: {n_layers: 6}
            depth_mode: interleave
            ramp_steps: 8
"""


@pytest.fixture(scope="module")
def growth_run(docs_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grow")
    (tmp / "grow.yaml").write_text(GROWTH_YAML)
    cli = main(
        [
            "fit",
            "-c",
            TINY,
            "-c",
            str(tmp / "grow.yaml"),
            f"--data.cache_dir={docs_cache}",
            f"--trainer.logger.init_args.save_dir={tmp}",
            "--trainer.max_steps=24",
            "--trainer.val_check_interval=16",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--model.optim.warmup_steps=2",
        ]
    )
    acc = EventAccumulator(glob.glob(f"{tmp}/tiny/version_0/events.out.tfevents.*")[0])
    acc.Reload()
    return cli, acc, tmp


def test_growth_callback_grows_during_fit(growth_run):
    cli, acc, _ = growth_run
    module = cli.model
    assert (module.arch.hidden_size, module.arch.n_heads, module.arch.n_layers) == (192, 6, 6)
    assert module.model.layers["5"].feed_forward.w1.weight.shape == (512, 192)
    assert module.growth_ramp is None and not any(
        m._forward_hooks or m._forward_pre_hooks for m in module.model.modules()
    )
    before = [e.value for e in acc.Scalars("growth/loss_before")]
    after = [e.value for e in acc.Scalars("growth/loss_after")]
    assert len(before) == 2 and after == pytest.approx(before, abs=1e-5)
    assert [e.value for e in acc.Scalars("growth/parameters")] == [2557632, 3443136]
    train = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert abs(train[6] - train[5]) < 0.5 and abs(train[12] - train[11]) < 0.5  # no jump beyond noise


def test_checkpoint_mid_ramp_restores_shape_and_masks(growth_run, docs_cache):
    _, acc, tmp = growth_run
    # Step 16 lies inside the second ramp (12 -> 20): 6 layers, masks at 0.5.
    ckpt = glob.glob(f"{tmp}/tiny/checkpoints/*step=16.ckpt")[0]
    saved = torch.load(ckpt, weights_only=True)
    assert saved["flm_growth"]["ramp"]["start_step"] == 12 and saved["hyper_parameters"]["arch"]["n_layers"] == 6
    again = main(
        [
            "validate",
            "-c",
            TINY,
            f"--data.cache_dir={docs_cache}",
            "--trainer.logger=false",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            f"--ckpt_path={ckpt}",
        ]
    )
    logged = acc.Scalars("val/loss")[0]
    assert logged.step == 15
    assert again.trainer.callback_metrics["val/loss"].item() == pytest.approx(logged.value, abs=1e-6)
    assert again.model._masks is not None and again.model._masks.m == pytest.approx(3 / 8)


def test_bad_schedule_fails_before_training(docs_cache, tmp_path, capsys):
    bad = GROWTH_YAML.replace("at_step: 12", "at_step: 9")  # inside the first ramp (6 -> 12)
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "-c",
                TINY,
                "-c",
                str(tmp_path / "bad.yaml"),
                f"--data.cache_dir={docs_cache}",
                "--trainer.logger=false",
                "--trainer.max_steps=20",
            ]
        )
    assert exit_info.value.code == 2
    assert "starts during the ramp" in capsys.readouterr().err
    (tmp_path / "shrink.yaml").write_text(
        GROWTH_YAML.replace("hidden_size: 192, n_heads: 6", "hidden_size: 96, n_heads: 3")
    )
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "-c",
                TINY,
                "-c",
                str(tmp_path / "shrink.yaml"),
                f"--data.cache_dir={docs_cache}",
                "--trainer.logger=false",
                "--trainer.max_steps=20",
            ]
        )
    assert "GrowthCallback stage 0: growth cannot shrink" in capsys.readouterr().err


def test_offline_growth_tool(growth_run, docs_cache, tmp_path):
    _, _, tmp = growth_run
    src = glob.glob(f"{tmp}/tiny/checkpoints/*step=24.ckpt")[0]  # after both ramps
    target = tmp_path / "wider.yaml"
    target.write_text(
        open(TINY)
        .read()
        .replace("hidden_size: 128", "hidden_size: 256")
        .replace("n_heads: 4", "n_heads: 8")
        .replace("n_layers: 4", "n_layers: 6")
        + "\n"
    )
    # The 24-step checkpoint has 192 wide 6 layers with ffn 512; the target: 256 wide, 8 heads.
    text = target.read_text().replace("    max_seq_len: 128", "    max_seq_len: 128\n    ffn_hidden_size: 704")
    target.write_text(text)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flm_lightning",
            "grow",
            "--ckpt",
            src,
            "--config",
            str(target),
            "--out",
            str(tmp_path / "grown.ckpt"),
            "--ramp-steps",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr

    def val(cfg, path):
        cli = main(
            [
                "validate",
                "-c",
                cfg,
                f"--data.cache_dir={docs_cache}",
                "--trainer.logger=false",
                "--trainer.limit_val_batches=2",
                "--trainer.enable_progress_bar=false",
                f"--ckpt_path={path}",
            ]
        )
        return cli.trainer.callback_metrics["val/loss"].item()

    assert val(str(target), tmp_path / "grown.ckpt") == pytest.approx(val(TINY, src), abs=1e-5)
    grown = torch.load(tmp_path / "grown.ckpt", weights_only=True)
    assert grown["optimizer_states"][0]["state"][0]["exp_avg"].shape == (2048, 256)
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "flm_lightning",
            "grow",
            "--ckpt",
            src,
            "--config",
            "conf/tiny.yaml",
            "--out",
            str(tmp_path / "x.ckpt"),
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "cannot shrink" in refused.stderr
    mid_ramp = glob.glob(f"{tmp}/tiny/checkpoints/*step=16.ckpt")[0]
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "flm_lightning",
            "grow",
            "--ckpt",
            mid_ramp,
            "--config",
            str(target),
            "--out",
            str(tmp_path / "y.ckpt"),
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "still in progress" in refused.stderr and not (tmp_path / "y.ckpt").exists()


def test_new_layers_change_the_function_little_at_the_end_of_the_ramp():
    """The measured cause of the val-loss rise after depth growth (docs/growth.md): a copied layer,
    once its mask reaches 1, applies its trained source's branch a second time, so the function drifts
    by about that branch over the ramp; a fresh layer (residual outputs at init_std / sqrt(2L)) barely
    moves it. GrowthCallback therefore adds random layers by default."""
    torch.manual_seed(0)
    old_cfg = tiny_config("teleflm")
    model = FLMTransformer(old_cfg)
    opt = build_adamw(model, OptimConfig(lr=1e-2, weight_decay=0.0))
    tokens = torch.randint(0, 100, (4, 33))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def loss(m):
        return torch.nn.functional.cross_entropy(m(inputs).flatten(0, 1), labels.flatten()).item()

    for _ in range(30):  # train, so the layers' branches are no longer at their init scale
        torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten()).backward()
        opt.step()
        opt.zero_grad()
    base = loss(model)
    drift = {}
    for init in ("copy", "random"):
        grown, _, _, plan = grow(model, replace(old_cfg, n_layers=2 * old_cfg.n_layers), init=init, seed=1)
        masks = GrowthMasks(grown, plan, m=0.0)
        assert loss(grown) == pytest.approx(base, abs=1e-5)  # function preserving at m = 0
        masks.remove()  # m = 1: the folded model the ramp ends at
        drift[init] = loss(grown) - base
    # measured: copy +0.025 nats, random -8e-6
    assert drift["copy"] > 0.015 and abs(drift["random"]) < 1e-4, drift
    assert GrowthCallback(stages=[{"arch": {"n_layers": 4}, "at_step": 1}]).stages[0].depth_init == "random"


def test_growth_choices_come_from_the_operators():
    """The depth choices are declared once, by the operators: GrowthSpec (so GrowthCallback stages) and the
    grow tool's options read them, so a new operator is added in flm_lightning/growth/operators.py alone."""
    import argparse
    import typing

    from flm_lightning.callbacks import GrowthStage

    from flm_lightning.growth.operators import DEPTH_INITS, DEPTH_MODES, DepthInit, DepthMode
    from flm_lightning.growth.state import GrowthSpec
    from flm_lightning.tools import grow as grow_tool

    spec_hints, stage_hints = typing.get_type_hints(GrowthSpec), typing.get_type_hints(GrowthStage)
    assert spec_hints["depth_mode"] == DepthMode and spec_hints["depth_init"] == stage_hints["depth_init"] == DepthInit
    parser = argparse.ArgumentParser()
    grow_tool.add_arguments(parser)
    choices = {a.dest: a.choices for a in parser._actions}
    assert tuple(choices["depth_mode"]) == DEPTH_MODES and tuple(choices["depth_init"]) == DEPTH_INITS
