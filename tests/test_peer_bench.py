"""The pure parts of benchmarks/litgpt_peer.py, without LitGPT: config translation, log parsing, spread."""

from pathlib import Path

import pytest

from benchmarks import litgpt_peer as peer
from flm_lightning.model import ModelConfig, count_model

LITGPT_LOG = """\
Seed set to 1234
Time to instantiate model: 0.07 seconds.
Total parameters: 5,310,720
Verifying settings ...
Measured TFLOPs: 0.06
Epoch 1 | iter 1 step 1 | loss train: 8.425, val: n/a | iter time: 2061.70 ms (step) remaining time: 0:00:04
Epoch 1 | iter 2 step 2 | loss train: 8.444, val: n/a | iter time: 1846.48 ms (step) remaining time: 0:00:01
Epoch 1 | iter 3 step 3 | loss train: 8.042, val: n/a | iter time: 1788.41 ms (step) remaining time: 0:00:00
Saving checkpoint to 'out/final/lit_model.pth'
"""


def test_default_shape_is_the_5_3m_llama_with_identical_counts():
    values = peer.resolve_config("conf/tiny.yaml", peer.DEFAULT_SETS)
    shape = peer.shape_of(values)
    cfg = peer.litgpt_model_config(shape.arch)
    assert (shape.arch.n_layers, shape.seq_len, shape.batch_size) == (4, 256, 8)  # conf/tiny.yaml's depth
    assert cfg["n_layer"] == 4 and cfg["n_embd"] == 256 and cfg["n_head"] == 4 and cfg["intermediate_size"] == 704
    assert cfg["norm_class_name"] == "RMSNorm" and cfg["mlp_class_name"] == "LLaMAMLP"
    assert cfg["rotary_percentage"] == 1.0 and cfg["parallel_residual"] is False and cfg["bias"] is False
    assert cfg["padded_vocab_size"] == 4096 and cfg["block_size"] == 256 and cfg["norm_eps"] == shape.arch.norm_eps
    # by hand: embedding + head, 4 x (2 norms, q k v o, gate up down), final norm
    hand = 2 * 4096 * 256 + 4 * (2 * 256 + 4 * 256 * 256 + 3 * 256 * 704) + 256
    assert hand == 5_310_720
    assert peer.litgpt_parameter_count(cfg) == count_model(shape.arch).parameters == hand


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(activation="gelu", bias=True, norm="layernorm"),
        dict(tie_embeddings=True, vocab_size=1000),  # padded to 1024 on both sides
        dict(n_heads=8, ffn_hidden_size=512, rope_theta=500000.0),
    ],
)
def test_translation_keeps_the_parameter_count(overrides):
    arch = ModelConfig(
        **{**dict(vocab_size=2048, n_layers=3, n_heads=4, hidden_size=128, max_seq_len=128), **overrides}
    )
    cfg = peer.litgpt_model_config(arch)
    assert cfg["padded_vocab_size"] == arch.padded_vocab_size
    assert peer.litgpt_parameter_count(cfg, arch.tie_embeddings) == count_model(arch).parameters


def test_translation_refuses_what_litgpt_cannot_build():
    with pytest.raises(peer.PeerError, match="xPos"):
        peer.litgpt_model_config(ModelConfig(position="xpos", max_seq_len=128))
    with pytest.raises(peer.PeerError, match="μP"):
        peer.litgpt_model_config(ModelConfig(output_mult=2.0))
    # LitGPT's LayerNorm always has a shift: without biases the counts differ, and the benchmark refuses
    arch = ModelConfig(norm="layernorm", bias=False, activation="gelu")
    assert peer.litgpt_parameter_count(peer.litgpt_model_config(arch)) != count_model(arch).parameters


def test_shape_refuses_accumulation_and_document_masks():
    values = peer.resolve_config("conf/tiny.yaml", [*peer.DEFAULT_SETS, "data.init_args.global_batch_size=16"])
    with pytest.raises(peer.PeerError, match="global_batch_size"):
        peer.shape_of(values)
    values = peer.resolve_config("conf/tiny.yaml", ["data.init_args.reset_at_document_boundaries=true"])
    with pytest.raises(peer.PeerError, match="document"):
        peer.shape_of(values)


def test_parse_litgpt_log():
    parsed = peer.parse_litgpt_log(LITGPT_LOG)
    assert parsed["parameters"] == 5_310_720
    assert [i["iter"] for i in parsed["iters"]] == [1, 2, 3]
    assert parsed["iters"][0] == {"iter": 1, "step": 1, "loss": 8.425, "iter_time_ms": 2061.70}
    # tokens / median iter time of the timed iterations (after warmup 1: iterations 2 and 3)
    tps = peer.litgpt_log_throughput(parsed["iters"], warmup=1, steps=2, tokens_per_step=2048)
    assert tps == pytest.approx(2048 / ((1846.48 + 1788.41) / 2 / 1000))
    assert peer.parse_litgpt_log("nothing here") == {"parameters": None, "iters": []}


def test_clock_throughput_uses_the_step_starts_after_warmup():
    record = {"side": "ours", "wall": [0.0, 5.0, 6.0, 7.0, 8.0], "cpu": [0.0, 4.0, 4.5, 5.0, 5.5]}
    r = peer.clock_throughput(record, warmup=1, steps=3, tokens_per_step=100)
    assert r["tokens_per_sec"] == pytest.approx(300 / 3.0) and r["tokens_per_cpu_sec"] == pytest.approx(300 / 1.5)
    with pytest.raises(peer.PeerError, match="need 6"):
        peer.clock_throughput(record, warmup=2, steps=3, tokens_per_step=100)


def test_spread_and_summary():
    assert peer.spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "min": 1.0, "max": 5.0, "iqr": 2.0}
    assert peer.spread([7.0]) == {"median": 7.0, "min": 7.0, "max": 7.0, "iqr": 0.0}
    ours = [{"tokens_per_sec": t, "tokens_per_cpu_sec": 2 * t} for t in (100.0, 110.0, 90.0)]
    litgpt = [{"tokens_per_sec": t, "tokens_per_cpu_sec": t} for t in (100.0, 100.0, 100.0)]
    s = peer.summarize(ours, litgpt)
    assert s["ratios"] == pytest.approx([1.0, 1.1, 0.9]) and s["ratio"]["median"] == pytest.approx(1.0)
    assert s["cpu_ratio"]["median"] == pytest.approx(2.0) and s["litgpt"]["iqr"] == 0.0
    assert s["ours"]["min"] == 90.0 and s["ours"]["max"] == 110.0


def test_run_configs_share_the_settings(tmp_path: Path):
    values = peer.resolve_config("conf/tiny.yaml", peer.DEFAULT_SETS)
    shape = peer.shape_of(values)
    ours = peer.ours_run_config(values, "bf16-mixed", 12, False, tmp_path, tmp_path / "clock.json")
    t = ours["trainer"]
    assert t["precision"] == "bf16-mixed" and t["max_steps"] == 12 and t["limit_val_batches"] == 0
    classes = [c["class_path"] for c in t["callbacks"]]
    assert classes[-1] == peer.CLOCK_CALLBACK and not any(c.endswith(peer.CHECKPOINT_CALLBACKS) for c in classes)
    assert values["trainer"]["max_steps"] == 400  # the loaded config is not modified
    lit = peer.litgpt_run_config(
        shape,
        peer.litgpt_model_config(shape.arch),
        "bf16-mixed",
        12,
        tmp_path / "w.npy",
        tmp_path / "clock.json",
        tmp_path / "tok",
        tmp_path / "out",
        shape.log_every,
    )
    tr = lit["train"]
    assert tr["micro_batch_size"] == tr["global_batch_size"] == 8 and tr["max_tokens"] == 12 * 8 * 256
    assert tr["max_norm"] == 1.0 and tr["lr_warmup_steps"] == 30 and tr["min_lr"] == 3e-4 and tr["log_interval"] == 10
    assert lit["optimizer"]["init_args"] == {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}
    assert lit["precision"] == "bf16-mixed" and lit["seed"] == 1234 and lit["data"]["class_path"] == peer.DATA_MODULE


def test_pip_output_check_finds_torch_and_cuda_wheels_only():
    clean = (
        "Requirement already satisfied: torch>=2.7 in ./.cache/litgpt-venv/lib/python3.11/site-packages\n"
        "Collecting torchmetrics>=0.7.0 (from lightning>=2.6.1->litgpt==0.5.13)\n"
        "Processing /opt/pypi/files/torchmetrics-1.9.0-py3-none-any.whl\n"
        "Collecting litgpt==0.5.13\n  Downloading litgpt-0.5.13-py3-none-any.whl (208 kB)\n"
    )
    assert peer.torch_fetches(clean) == []
    bad = (
        "Collecting torch>=2.7 (from litgpt==0.5.13)\n"
        "  Downloading torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl (900 MB)\n"
        "Collecting nvidia-cublas-cu12==12.8.4.1 (from torch>=2.7)\n"
    )
    assert peer.torch_fetches(bad) == [
        "nvidia-cublas-cu12==12.8.4.1",
        "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl",
        "torch>=2.7",
    ]
