import math

import pytest
import torch

from flm_lightning.errors import ConfigError
from flm_lightning.model import FLMTransformer, ModelConfig
from flm_lightning.model.layers import RotaryEmbedding, apply_rotary
from tests.conftest import tiny_config


def test_logits_shape_and_padded_vocab(family):
    cfg = tiny_config(family, vocab_size=100, pad_vocab_multiple=64)
    model = FLMTransformer(cfg)
    logits = model(torch.randint(0, 100, (3, 10)))
    assert cfg.padded_vocab_size == 128
    assert logits.shape == (3, 10, 128)
    assert model.tok_embeddings.weight.shape == (128, 32)


def test_mlp_shapes_per_family():
    gelu = FLMTransformer(tiny_config("flm101b")).layers["0"].feed_forward
    assert gelu.w1.weight.shape == (128, 32) and gelu.w2.weight.shape == (32, 128)  # 4d
    assert gelu.w1.bias is not None and not hasattr(gelu, "w3")
    swiglu = FLMTransformer(tiny_config("teleflm")).layers["0"].feed_forward
    assert swiglu.w1.weight.shape == swiglu.w3.weight.shape == (128, 32)  # 8/3 d = 85, rounded up to 64s
    assert swiglu.w2.weight.shape == (32, 128) and swiglu.w1.bias is None
    x = torch.randn(2, 5, 32)
    expected = swiglu.w2(torch.nn.functional.silu(swiglu.w1(x)) * swiglu.w3(x))
    torch.testing.assert_close(swiglu(x), expected)


def test_norm_and_bias_per_family():
    flm = FLMTransformer(tiny_config("flm101b"))
    tele = FLMTransformer(tiny_config("teleflm"))
    assert isinstance(flm.norm, torch.nn.LayerNorm) and flm.norm.bias is not None
    assert isinstance(tele.norm, torch.nn.RMSNorm) and tele.norm.eps == 1e-6
    assert all(p.ndim == 2 for n, p in tele.named_parameters() if "norm" not in n)


def test_tied_embeddings_are_one_tensor():
    model = FLMTransformer(tiny_config("flm101b"))
    assert model.output is None
    names = [n for n, _ in model.named_parameters()]
    assert "tok_embeddings.weight" in names and not any(n.startswith("output") for n in names)
    tokens = torch.randint(0, 100, (2, 6))
    model(tokens).sum().backward()
    # The head's gradient lands on the embedding: rows of tokens never seen as input get some too.
    unseen = sorted(set(range(100)) - set(tokens.flatten().tolist()))[0]
    assert model.tok_embeddings.weight.grad[unseen].abs().sum() > 0
    with torch.no_grad():
        model.tok_embeddings.weight[unseen] += 1.0
    h = torch.randn(1, 1, 32)
    torch.testing.assert_close(model.logits(h)[0, 0, unseen], (h[0, 0] * model.tok_embeddings.weight[unseen]).sum())


def test_untied_head_is_separate():
    model = FLMTransformer(tiny_config("teleflm"))
    assert model.output is not None
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()


def test_causal_no_information_from_the_future(family):
    model = FLMTransformer(tiny_config(family)).eval()
    tokens = torch.randint(0, 100, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def _scores(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rotary = RotaryEmbedding(cfg)
    qn, _ = apply_rotary(q, q, rotary(torch.tensor([n])))
    _, km = apply_rotary(k, k, rotary(torch.tensor([m])))
    return (qn * km).sum(-1)


@pytest.mark.parametrize("position", ["rope", "xpos"])
def test_scores_depend_only_on_relative_position(position):
    cfg = tiny_config("teleflm", position=position, max_seq_len=2048)
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    for n, m in [(5, 2), (100, 37), (900, 899)]:
        base = _scores(cfg, q, k, n, m)
        for shift in (1, 50, 700):
            torch.testing.assert_close(_scores(cfg, q, k, n + shift, m + shift), base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_scores(cfg, q, k, 10, 2), _scores(cfg, q, k, 10, 9))


def test_xpos_is_rope_times_the_per_pair_decay():
    rope = tiny_config("teleflm", position="rope", max_seq_len=2048)
    xpos = tiny_config("teleflm", position="xpos", max_seq_len=2048)
    d, base, n, m = rope.head_size, xpos.xpos_scale_base, 700, 100
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    rot = RotaryEmbedding(rope)
    qn, _ = apply_rotary(q, q, rot(torch.tensor([n])))
    _, km = apply_rotary(k, k, rot(torch.tensor([m])))
    j = torch.arange(d // 2, dtype=torch.float64)
    zeta = ((2 * j / d + 0.4) / 1.4) ** ((n - m) / base)
    expected = (qn * km * torch.cat([zeta, zeta]).float()).sum(-1)
    torch.testing.assert_close(_scores(xpos, q, k, n, m), expected, rtol=1e-5, atol=1e-6)
    assert float(zeta.min()) < 1.0  # distant keys are damped


def test_xpos_tables_stay_finite_at_every_allowed_position():
    # The longest table a scale base of 512 allows (head 128: the steepest pair, zeta = 0.4/1.4).
    cfg = tiny_config("flm101b", hidden_size=128, n_heads=1, max_seq_len=65390, xpos_scale_base=512.0)
    scale = RotaryEmbedding(cfg).xpos_scale
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert math.log(scale.max().item()) == pytest.approx(cfg.xpos_max_log_scale, abs=1e-4)
    assert cfg.xpos_max_log_scale <= 80
    with pytest.raises(ConfigError, match=r"max_seq_len \(65392\) is too long for xPos .* max_seq_len <= 65390"):
        tiny_config("flm101b", hidden_size=128, n_heads=1, max_seq_len=65392, xpos_scale_base=512.0)


def test_input_longer_than_max_seq_len_is_one_clear_error(family):
    model = FLMTransformer(tiny_config(family, max_seq_len=16)).eval()
    assert model(torch.randint(0, 100, (1, 16))).shape == (1, 16, 128)  # exactly the limit runs
    with pytest.raises(ConfigError, match=r"the input holds 17 positions, more than model.arch.max_seq_len \(16\)"):
        model(torch.randint(0, 100, (1, 17)))
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 12)), kv_cache=cache)
        with pytest.raises(ConfigError, match=r"holds 5 positions after 12 cached"):
            model(torch.randint(0, 100, (1, 5)), kv_cache=cache)


def test_multipliers_scale_embeddings_and_logits():
    base = tiny_config("teleflm")
    model = FLMTransformer(base)
    tokens = torch.randint(0, 100, (2, 7))
    scaled_out = FLMTransformer(tiny_config("teleflm", output_mult=0.5, base_hidden_size=8))
    scaled_out.load_state_dict(model.state_dict())
    torch.testing.assert_close(scaled_out(tokens), model(tokens) * 0.5 / 4.0)  # width_mult = 32 / 8
    scaled_in = FLMTransformer(tiny_config("teleflm", input_mult=3.0))
    scaled_in.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3.0)
    torch.testing.assert_close(scaled_in(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_logit_scale_is_output_mult_over_width_mult():
    """One definition of the logit factor (ModelConfig.logit_scale), read by the model, its pipeline stages,
    the growth operators and the Hugging Face conversion."""
    assert tiny_config("teleflm", output_mult=0.5, base_hidden_size=8).logit_scale == 0.5 / 4.0
    assert tiny_config("teleflm").logit_scale == 1.0


def test_layers_keep_stable_names():
    model = FLMTransformer(tiny_config("teleflm", n_layers=3))
    names = {n for n, _ in model.named_parameters()}
    for expected in (
        "layers.2.attention.wq.weight",
        "layers.2.attention.wo.weight",
        "layers.2.feed_forward.w3.weight",
        "layers.2.attention_norm.weight",
        "layers.2.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ):
        assert expected in names


def test_pipeline_stage_without_embedding_or_head_runs():
    model = FLMTransformer(tiny_config("teleflm"))
    model.tok_embeddings, model.norm, model.output = None, None, None
    h = torch.randn(2, 5, 32)
    assert model(h).shape == (2, 5, 32)


def test_residual_projections_use_scaled_init():
    cfg = tiny_config("teleflm", n_layers=8, hidden_size=256, n_heads=4, init_std=0.02)
    model = FLMTransformer(cfg)
    wq_std = model.layers["0"].attention.wq.weight.std().item()
    wo_std = model.layers["0"].attention.wo.weight.std().item()
    assert wq_std == pytest.approx(0.02 * 0.9866, rel=0.05)  # truncation at 3 sigma shrinks the std
    assert wo_std == pytest.approx(wq_std / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, n_heads=4), "hidden_size"),
        (dict(norm="batchnorm"), "norm"),
        (dict(activation="relu"), "activation"),
        (dict(position="alibi"), "position"),
        (dict(n_layers=-1), "n_layers"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(ffn_hidden_size=-64), "ffn_hidden_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_layers="4x"), "n_layers"),
        (dict(head_dim=7, hidden_size=28, n_heads=4), "head_dim"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"model\.arch\.{field}"):
        tiny_config("teleflm", **overrides)


def test_unknown_field_rejected():
    with pytest.raises(ConfigError, match="unknown field.*hiden_size"):
        ModelConfig.from_dict({"hiden_size": 64})


def test_derived_sizes_follow_edits():
    from dataclasses import replace

    cfg = tiny_config("teleflm")
    wider = replace(cfg, hidden_size=64)
    assert (cfg.head_size, cfg.ffn_size) == (8, 128)
    assert (wider.head_size, wider.ffn_size) == (16, 192)


def test_config_choices_are_literal_fields():
    """A choice of the configs is a typing.Literal field (the CLI checks it, the dataclass too, in the same words)."""
    import typing

    from flm_lightning.optim import OptimConfig

    for cls, names in (
        (ModelConfig, ("norm", "activation", "position", "attention_backend")),
        (OptimConfig, ("decay",)),
    ):
        hints = typing.get_type_hints(cls)
        assert all(typing.get_origin(hints[name]) is typing.Literal for name in names), cls
    with pytest.raises(
        ConfigError, match=r"model.arch.norm must be one of \['layernorm', 'rmsnorm'\], got 'batchnorm'"
    ):
        tiny_config("teleflm", norm="batchnorm")
