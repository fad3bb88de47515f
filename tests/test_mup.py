"""μP: roles, initialisation and learning rates as functions of width, re-derived after growth."""

from dataclasses import replace

import pytest
import torch

from flm_lightning.errors import ConfigError
from flm_lightning.model import FLMTransformer
from flm_lightning.module import FLMLightningModule
from flm_lightning.mup import MuP, MuPConfig, role
from flm_lightning.optim import OptimConfig
from tests.conftest import tiny_config

EXPECTED = {
    "tok_embeddings.weight": "embedding",
    "layers.0.attention.wq.weight": "hidden",
    "layers.0.attention.wk.weight": "hidden",
    "layers.0.attention.wv.weight": "hidden",
    "layers.0.attention.wo.weight": "residual_out",
    "layers.0.feed_forward.w1.weight": "hidden",
    "layers.0.feed_forward.w2.weight": "residual_out",
    "layers.0.attention_norm.weight": "vector",
    "layers.0.ffn_norm.weight": "vector",
    "norm.weight": "vector",
}


def test_every_parameter_gets_its_role(family):
    model = FLMTransformer(tiny_config(family))
    roles = {name: role(name) for name, _ in model.named_parameters()}
    for name, expected in EXPECTED.items():
        assert roles[name] == expected, name
    if family == "teleflm":
        assert roles["output.weight"] == "readout" and roles["layers.1.feed_forward.w3.weight"] == "hidden"
    else:  # biases and LayerNorm shifts are vector-like; the tied head is the embedding
        assert roles["layers.0.attention.wq.bias"] == "vector" and roles["norm.bias"] == "vector"
        assert "output.weight" not in roles


def _mup(width, base=64, **kw):
    arch = tiny_config(
        "teleflm", hidden_size=width, n_heads=width // 16, head_dim=16, base_hidden_size=base, n_layers=4
    )
    return MuP(MuPConfig(base_hidden_size=base, std=0.01, matrix_std=0.02, **kw), arch, lr=1e-3), arch


def test_init_and_lr_scale_with_width():
    for width in (64, 128, 512):
        mup, arch = _mup(width)
        r = width / 64
        assert mup.init_std("layers.0.attention.wq.weight") == pytest.approx(0.02 / r**0.5)
        assert mup.init_std("layers.0.attention.wo.weight") == pytest.approx(0.02 / r**0.5 / 8**0.5)
        assert mup.init_std("tok_embeddings.weight") == mup.init_std("output.weight") == 0.01
        assert mup.init_std("norm.weight") is None
        assert mup.learning_rate("layers.0.feed_forward.w1.weight") == pytest.approx(1e-3 / r)
        assert mup.learning_rate("norm.weight") == mup.learning_rate("output.weight") == 1e-3
        model = FLMTransformer(arch)
        mup.initialize(model)
        measured = model.layers["0"].feed_forward.w1.weight.std().item()
        assert measured == pytest.approx(0.02 / r**0.5 * 0.9866, rel=0.05)  # truncation at 3 sigma
        assert torch.equal(model.norm.weight, torch.ones(width))
    mup, _ = _mup(128, matrix_lr=5e-4)
    assert mup.learning_rate("layers.0.attention.wq.weight") == pytest.approx(2.5e-4)


def test_optimizer_groups_follow_roles_and_regrow():
    arch = tiny_config("teleflm", hidden_size=64, n_heads=4, head_dim=16)
    module = FLMLightningModule(
        arch=arch, optim=OptimConfig(lr=1e-3, decay_steps=10), mup=MuPConfig(base_hidden_size=32)
    )
    module.configure_model()
    groups = {g["name"]: g for g in module.build_optimizer().param_groups}
    assert groups["mup_hidden"]["lr"] == pytest.approx(5e-4) and groups["mup_vector"]["lr"] == 1e-3
    assert groups["mup_vector"]["weight_decay"] == 0.0 and groups["mup_hidden"]["weight_decay"] == 0.1
    module.apply_growth(replace(module.arch, hidden_size=128, n_heads=8), ramp_steps=0)
    groups = {g["name"]: g for g in module.build_optimizer().param_groups}
    assert groups["mup_hidden"]["lr"] == pytest.approx(1e-3 / 4)  # r = 128 / 32, re-derived exactly
    assert module.mup.width_mult == 4.0


def test_mismatched_base_width_is_refused():
    with pytest.raises(ConfigError, match="base_hidden_size"):
        FLMLightningModule(arch=tiny_config("teleflm", base_hidden_size=16), mup=MuPConfig(base_hidden_size=32))
    with pytest.raises(ConfigError, match="model.mup.matrix_lr"):
        MuPConfig(base_hidden_size=32, matrix_lr=-1.0)


def test_base_width_is_read_from_the_arch_alone():
    """model.arch.base_hidden_size is the one base width: model.mup may leave it out, and without either the
    run stops before any state exists."""
    arch = tiny_config("teleflm", hidden_size=64, n_heads=4, head_dim=16, base_hidden_size=16)
    assert MuP(MuPConfig(), arch, 1e-3).width_mult == 4.0 == arch.width_mult
    module = FLMLightningModule(arch=arch, mup=MuPConfig(std=0.01))
    assert module.arch.base_hidden_size == 16 and module.mup.width_mult == 4.0
    with pytest.raises(ConfigError, match="μP needs a base width"):
        FLMLightningModule(arch=replace(arch, base_hidden_size=None), mup=MuPConfig())


def test_mup_module_applies_the_logit_multiplier_in_forward():
    arch = tiny_config("teleflm", hidden_size=64, n_heads=4, head_dim=16, output_mult=0.5)
    module = FLMLightningModule(arch=arch, mup=MuPConfig(base_hidden_size=16))
    module.configure_model()
    assert module.arch.base_hidden_size == 16  # taken from model.mup when the arch leaves it unset
    plain = FLMTransformer(arch)  # same weights, no μP base: logits times output_mult only
    plain.load_state_dict(module.model.state_dict())
    tokens = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(module(tokens), plain(tokens) / 4.0)  # r = 64 / 16


def test_growth_rederives_every_rule_exactly():
    arch = tiny_config("teleflm", hidden_size=32, n_heads=2, head_dim=16)
    module = FLMLightningModule(
        arch=arch, optim=OptimConfig(lr=1e-3, decay_steps=10), mup=MuPConfig(base_hidden_size=16)
    )
    module.configure_model()
    target = replace(module.arch, hidden_size=96, n_heads=6, n_layers=3)
    module.apply_growth(target, ramp_steps=0)
    fresh = MuP(MuPConfig(base_hidden_size=16), target, 1e-3)
    for name, _ in module.model.named_parameters():
        assert module.mup.init_std(name) == fresh.init_std(name), name
        assert module.mup.learning_rate(name) == fresh.learning_rate(name), name
    assert module.mup.init_std("layers.2.attention.wo.weight") == 0.02 / 6**0.5 / 6**0.5  # r = 6, 2L = 6
    assert module.model.config.width_mult == 6.0  # the forward's logit multiplier follows the new width
    lrs = {g["name"]: g["lr"] for g in module.build_optimizer().param_groups}
    assert lrs == {
        "mup_embedding": 1e-3,
        "mup_hidden": 1e-3 / 6,
        "mup_residual_out": 1e-3 / 6,
        "mup_readout": 1e-3,
        "mup_vector": 1e-3,
    }
