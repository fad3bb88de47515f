import pytest

from flm_lightning.errors import ConfigError
from flm_lightning.model import FLMTransformer
from flm_lightning.optim import OptimConfig, build_adamw, build_scheduler, lr_at
from tests.conftest import tiny_config


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, decay="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-5)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-5)


def test_linear_and_constant_decay():
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear")
    assert [lr_at(s, linear, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    constant = OptimConfig(lr=0.5, min_lr=0.0, warmup_steps=2, decay="constant")
    assert lr_at(100, constant, 10) == 0.5


def test_scheduler_drives_the_optimizer_lr():
    model = FLMTransformer(tiny_config("teleflm"))
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4)
    opt = build_adamw(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg, 20) for s in range(20)])


def test_no_weight_decay_on_norms_and_biases():
    model = FLMTransformer(tiny_config("flm101b"))
    decay, no_decay = build_adamw(model, OptimConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == total
    assert decay["betas"] == (0.9, 0.95)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(lr=0), "lr"),
        (dict(min_lr=1.0, lr=0.1), "min_lr"),
        (dict(decay="step"), "decay"),
        (dict(betas=(0.9, 1.2)), "betas"),
    ],
)
def test_bad_optim_config(kwargs, field):
    with pytest.raises(ConfigError, match=rf"model\.optim\.{field}"):
        OptimConfig(**kwargs)
