"""Attention backends, activation checkpointing, compile, lean cross-entropy, fused AdamW."""

import json
import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from flm_lightning import objective
from flm_lightning.errors import ConfigError
from flm_lightning.model import FLMTransformer
from flm_lightning.model.attention import attend, math_attention
from flm_lightning.module import FLMLightningModule
from flm_lightning.objective import token_cross_entropy
from flm_lightning.optim import OptimConfig, build_adamw, param_groups
from flm_lightning.parallel.compute import apply_activation_checkpointing, apply_compile
from tests.conftest import tiny_config


def document_mask(bsz: int, seq: int, boundaries: list[int]) -> torch.Tensor:
    """Causal within documents: [B, 1, T, T] bool, documents starting at `boundaries`."""
    doc = torch.zeros(seq, dtype=torch.long)
    for b in boundaries:
        doc[b:] += 1
    same = doc[:, None] == doc[None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return (same & causal).expand(bsz, 1, seq, seq)


def loss_and_grads(model, tokens, mask=None):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, attention_mask=mask)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "document-mask"])
def test_sdpa_matches_reference_math_attention(family, masked):
    """Both families (RoPE and xPos), fp32: logits and gradients of sdpa equal the written-out softmax."""
    torch.manual_seed(0)
    cfg = tiny_config(family)
    reference = FLMTransformer(replace(cfg, attention_backend="math"))
    fast = FLMTransformer(cfg)
    fast.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    mask = document_mask(2, 24, [9, 17]) if masked else None
    ref_logits, ref_grads = loss_and_grads(reference, tokens, mask)
    logits, grads = loss_and_grads(fast, tokens, mask)
    assert torch.allclose(logits, ref_logits, atol=2e-6, rtol=0)
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) < 1e-6


def test_backends_agree_on_kv_cache_queries():
    """Queries that are the last of the keys (generation) see every earlier key on both backends."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    out = attend(q, k, v, "sdpa")
    assert torch.allclose(out, attend(q, k, v, "math"), atol=1e-6)
    last = torch.softmax(q[:, :, -1:] @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v  # the last query sees all keys
    assert torch.allclose(out[:, :, -1:], last, atol=1e-6)
    assert torch.allclose(
        math_attention(q, k, v)[:, :, :1], attend(q[:, :, :1], k[:, :, :7], v[:, :, :7], "math"), atol=1e-6
    )


@pytest.mark.parametrize("backend, package", [("flash", "flash_attn"), ("te", "transformer_engine")])
def test_gpu_backends_on_cpu_fail_clearly(backend, package):
    model = FLMTransformer(tiny_config("teleflm", attention_backend=backend))
    with pytest.raises(
        ConfigError,
        match=f"model.arch.attention_backend={backend} cannot run: the {package} package "
        rf"is not installed \(pip install 'flm-lightning\[{backend}\]'",
    ):
        model(torch.randint(0, 100, (1, 8)))


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch.attention_backend must be one of"):
        tiny_config("teleflm", attention_backend="xformers")


def test_auto_falls_back_to_sdpa_on_cpu_and_says_so(caplog):
    torch.manual_seed(0)
    cfg = tiny_config("flm101b")
    auto = FLMTransformer(replace(cfg, attention_backend="auto"))
    sdpa = FLMTransformer(cfg)
    sdpa.load_state_dict(auto.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with caplog.at_level(logging.INFO, logger="flm_lightning.model.attention"):
        out = auto(tokens)
    assert torch.equal(out, sdpa(tokens))
    assert any(
        "auto -> sdpa on cpu" in r.getMessage() and "flash_attn package is not installed" in r.getMessage()
        for r in caplog.records
    )


def test_backend_is_not_a_function_field():
    cfg = tiny_config("teleflm")
    assert replace(cfg, attention_backend="flash").function_fields() == cfg.function_fields()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_gradients_and_names(family, mode):
    torch.manual_seed(0)
    cfg = tiny_config(family)
    model = FLMTransformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    names = list(model.state_dict())
    logits, grads = loss_and_grads(model, tokens)
    apply_activation_checkpointing(model, mode)
    assert all(type(b).__name__ == "CheckpointedTransformerBlock" for b in model.layers.values())
    ac_logits, ac_grads = loss_and_grads(model, tokens)
    assert list(model.state_dict()) == names and list(ac_grads) == list(grads)
    assert torch.allclose(ac_logits, logits, atol=1e-6, rtol=0)
    assert max((ac_grads[n] - grads[n]).abs().max().item() for n in grads) < 1e-6
    apply_activation_checkpointing(model, "none")
    assert all(type(b).__name__ == "TransformerBlock" for b in model.layers.values())


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while running fn."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_selective_recomputes_no_matmul_and_full_recomputes_the_forward():
    """Matmul FLOPs of the backward pass: selective serves them from what it kept, full runs them again."""
    torch.manual_seed(0)
    cfg = tiny_config("teleflm")
    model = FLMTransformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    backward_flops, forward_flops = {}, {}
    for mode in ("none", "selective", "full"):
        apply_activation_checkpointing(model, mode)
        with FlopCounterMode(display=False) as forward:
            loss = model(tokens).sum()
        with FlopCounterMode(display=False) as backward:
            loss.backward()
        forward_flops[mode], backward_flops[mode] = forward.get_total_flops(), backward.get_total_flops()
    blocks = forward_flops["none"] - 2 * 2 * 16 * cfg.hidden_size * cfg.padded_vocab_size  # minus the output head
    assert backward_flops["selective"] == backward_flops["none"] == 2 * forward_flops["none"]
    # Full recomputes each block up to its last saved tensor: every matmul but the final w2.
    w2 = 2 * 2 * 16 * cfg.ffn_size * cfg.hidden_size * cfg.n_layers
    assert backward_flops["full"] == backward_flops["none"] + blocks - w2


def test_compile_keeps_names_and_outputs():
    torch.manual_seed(0)
    cfg = tiny_config("teleflm")
    model = FLMTransformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    names, expected = list(model.state_dict()), model(tokens)
    apply_activation_checkpointing(model, "full")
    apply_compile(model, backend="eager")  # dynamo tracing without a C++ build: fast on CPU
    assert list(model.state_dict()) == names
    assert torch.allclose(model(tokens), expected, atol=1e-6)


def test_module_applies_checkpointing_and_rejects_unknown_modes():
    module = FLMLightningModule(arch=tiny_config("teleflm"), activation_checkpointing="selective")
    module.configure_model()
    assert all(b.checkpoint_mode == "selective" for b in module.model.layers.values())
    with pytest.raises(ConfigError, match="model.activation_checkpointing must be one of"):
        FLMLightningModule(arch=tiny_config("teleflm"), activation_checkpointing="some")


def test_lean_cross_entropy_matches_plain_fp32_values_and_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(3, 40, 700) * 3).bfloat16().requires_grad_()
    labels = torch.randint(0, 700, (3, 40))
    labels[0, :4] = -100  # ignored targets give 0 loss and 0 gradient, as in F.cross_entropy
    weights = torch.rand(3, 40)
    lean = token_cross_entropy(logits, labels)
    (lean * weights).sum().backward()
    lean_grad, logits.grad = logits.grad, None
    plain = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    (plain * weights).sum().backward()
    assert lean.dtype == torch.float32 and torch.allclose(lean, plain, atol=4e-6, rtol=0)
    assert lean_grad.dtype == torch.bfloat16
    # Same fp32 gradient, cast once to bf16: at most one rounding step apart.
    assert (lean_grad.float() - logits.grad.float()).abs().max() <= 2e-6 + 2**-8 * logits.grad.float().abs().max()
    assert (lean_grad[0, :4] == 0).all()


def test_lean_cross_entropy_chunks_change_nothing(monkeypatch):
    # Every per-token value is computed within its own row, so any chunking gives the same bits.
    torch.manual_seed(0)
    logits = (torch.randn(2, 61, 300) * 3).bfloat16()
    labels = torch.randint(0, 300, (2, 61))
    labels[1, 5:9] = -100
    weights = torch.rand(2, 61)
    results = []
    for elements in (2**24, 9 * 300, 300):  # one chunk; 9 rows (122 = 13 x 9 + 5); the 8-row floor
        monkeypatch.setitem(objective.LEAN_CE_CHUNK_ELEMENTS, "cpu", elements)
        x = logits.clone().requires_grad_()
        loss = token_cross_entropy(x, labels)
        (loss * weights).sum().backward()
        results.append((objective.lean_chunk_rows(x.flatten(0, 1)), loss.detach(), x.grad))
    assert [rows for rows, _, _ in results] == [2**24 // 300, 9, 8]
    for _, loss, grad in results[1:]:
        assert torch.equal(loss, results[0][1]) and torch.equal(grad, results[0][2])


def test_lean_cross_entropy_keeps_no_fp32_logits():
    logits = torch.randn(256, 4096).bfloat16().requires_grad_()
    labels = torch.randint(0, 4096, (256,))
    lean = _saved_bytes(lambda: token_cross_entropy(logits[None], labels[None]).sum())
    plain = _saved_bytes(lambda: F.cross_entropy(logits.float(), labels, reduction="none").sum())
    logit_bytes = logits.numel() * 2
    assert plain >= 2 * logit_bytes  # the fp32 log-softmax
    assert lean < 1.1 * logit_bytes  # the bf16 logits and one fp32 number per token


def test_fused_adamw_on_cpu_matches_the_loop():
    torch.manual_seed(0)
    model, reference = FLMTransformer(tiny_config("teleflm")), FLMTransformer(tiny_config("teleflm"))
    reference.load_state_dict(model.state_dict())
    cfg = OptimConfig()
    fused = build_adamw(model, cfg)
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(
        param_groups(reference.named_parameters(), cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        foreach=False,
    )
    for step in range(3):
        for a, b in zip(model.parameters(), reference.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters())) < 1e-6


def _random_batches(n: int, bsz: int, seq: int, vocab: int):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n * bsz, seq + 1), generator=generator)
    rows = [{"input_ids": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq)} for t in tokens]
    return torch.utils.data.DataLoader(rows, batch_size=bsz)


def test_throughput_monitor_logs_mfu_against_the_given_peak():
    import lightning as L
    from flm_lightning.callbacks import TokenThroughputMonitor

    module = FLMLightningModule(arch=tiny_config("teleflm"), optim=OptimConfig(warmup_steps=1))
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TokenThroughputMonitor(window_size=2, peak_tflops=1e-4)],
    )
    trainer.fit(module, _random_batches(4, 2, 16, 100))
    metrics = trainer.callback_metrics
    flops_per_token = module.flops_per_batch / (2 * 16)
    assert metrics["throughput/tokens_per_sec"] > 0
    assert metrics["throughput/tflops"].item() == pytest.approx(
        metrics["throughput/tokens_per_sec"].item() * flops_per_token / 1e12, rel=1e-5
    )
    assert metrics["throughput/mfu"].item() == pytest.approx(metrics["throughput/tflops"].item() / 1e-4, rel=1e-5)


def test_bench_tool_reports_both_throughputs_and_memory(tmp_path, docs_cache, capsys):
    import yaml

    from flm_lightning.__main__ import main as tool_main
    from tests.conftest import TINY

    config = yaml.safe_load(open(TINY))
    config["data"]["init_args"].update(cache_dir=str(docs_cache), batch_size=4, seq_len=32)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    tool_main(
        [
            "bench",
            "-c",
            str(tmp_path / "bench.yaml"),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
            str(tmp_path / "bench.json"),
        ]
    )
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert "trainer tokens/s" in out and "(trainer / loop)" in out and "peak memory: trainer" in out
    assert len(result["trainer_tokens_per_sec"]) == len(result["loop_tokens_per_sec"]) == 2
    assert all(v > 0 for v in result["trainer_tokens_per_sec"] + result["loop_tokens_per_sec"])
    assert result["median_ratio"] == pytest.approx(sorted(result["ratios"])[0] / 2 + sorted(result["ratios"])[1] / 2)
    assert result["trainer_peak_memory_bytes"] > 0 and result["loop_peak_memory_bytes"] > 0
    assert (result["batch_size"], result["seq_len"], result["device"]) == (4, 32, "cpu")
    assert "trainer_mfu" not in result  # no MFU on a CPU without a peak


def test_bf16_mixed_clips_gradients_of_the_fused_optimizer():
    """Lightning's mixed-precision plugin refuses to clip for fused optimizers; the module's step clips itself,
    with the step's global gradient norm."""
    import lightning as L

    module = FLMLightningModule(arch=tiny_config("teleflm"))
    module.configure_model()
    module.trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False, gradient_clip_val=0.5)
    optimizer = module.build_optimizer()
    assert optimizer.defaults["fused"]
    for p in module.model.parameters():
        p.grad = torch.ones_like(p)
    before = torch.nn.utils.get_total_norm([p.grad for p in module.model.parameters()]).item()
    module.on_before_optimizer_step(optimizer)
    assert module.grad_norm().item() == pytest.approx(before, rel=1e-6)  # logged before clipping
    assert torch.nn.utils.get_total_norm([p.grad for p in module.model.parameters()]).item() == pytest.approx(
        0.5, rel=1e-5
    )


def test_sharded_parameters_keep_foreach_adamw():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        layer = torch.nn.Linear(4, 4, bias=False)
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
        optimizer = build_adamw(layer, OptimConfig())
        assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"]
    finally:
        dist.destroy_process_group()
