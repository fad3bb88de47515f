"""Attention kernels behind one call, chosen by `model.arch.attention_backend`.

Every backend receives q, k, v already rotated (RoPE or xPos is applied before attention), in
the [B, H, T, D] layout, and returns [B, H, T_q, D]:

- `sdpa` (default): `F.scaled_dot_product_attention`; runs everywhere, takes document masks.
- `math`: the reference, softmax(Q K^T / sqrt(D) + mask) V written out in fp32. Slow; for tests.
- `flash`: `flash_attn.flash_attn_func` (pip install 'flm-lightning[flash]'); CUDA, fp16/bf16
  inputs (`trainer.precision: bf16-mixed`), causal only: it cannot take a document mask.
- `te`: NVIDIA Transformer Engine's `DotProductAttention` (pip install 'flm-lightning[te]');
  CUDA, fp16/bf16, causal only, FP8 never enabled (no `fp8_autocast`). Only attention uses TE:
  the linear layers, norms and MLPs stay PyTorch modules, so parameter names never change.
- `auto`: `flash` when it can run on the inputs, else `sdpa` (e.g. on CPU, in fp32, or with a
  document mask).

The backend does not change what the model computes, so it is not one of the config's
function fields: checkpoints and exports move freely between backends.
A requested backend that cannot run raises `ConfigError` at the first forward pass, where the
device and dtype are known; the backend that runs is logged once per (device, dtype, mask).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F

from flm_lightning.errors import ConfigError

log = logging.getLogger(__name__)

AttentionBackend = Literal["sdpa", "math", "flash", "te", "auto"]
ATTENTION_BACKENDS = get_args(AttentionBackend)
_HALF = (torch.float16, torch.bfloat16)


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """Boolean [n_queries, n_keys] mask for queries that are the last n_queries of n_keys positions."""
    offset = n_keys - n_queries
    q = torch.arange(n_queries, device=device)[:, None] + offset
    return torch.arange(n_keys, device=device)[None, :] <= q


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype, masked: bool) -> Optional[str]:
    """Why `backend` cannot run on these inputs, or None when it can."""
    if backend in ("sdpa", "math"):
        return None
    package, extra = ("flash_attn", "flash") if backend == "flash" else ("transformer_engine", "te")
    if not _importable(package):
        return f"the {package} package is not installed (pip install 'flm-lightning[{extra}]' on a CUDA machine)"
    if device.type != "cuda":
        return f"it runs on CUDA GPUs only, not on {device.type}"
    if dtype not in _HALF:
        return f"it needs fp16/bf16 inputs, got {dtype} (set trainer.precision=bf16-mixed)"
    if masked:
        return "it cannot take the document attention mask of this batch (use sdpa, or auto to fall back)"
    return None


_resolved: dict[tuple, str] = {}


@torch.compiler.assume_constant_result  # a compiled block evaluates it once, at trace time
def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, masked: bool) -> str:
    """The backend that runs for these inputs; decided and logged once per (device, dtype, mask)."""
    key = (requested, device, dtype, masked)
    if key not in _resolved:
        _resolved[key] = _resolve(requested, device, dtype, masked)
    return _resolved[key]


def _resolve(requested: str, device: torch.device, dtype: torch.dtype, masked: bool) -> str:
    if requested == "auto":
        reason = unavailable_reason("flash", device, dtype, masked)
        chosen = "flash" if reason is None else "sdpa"
        log.info(
            "attention backend auto -> %s on %s %s%s",
            chosen,
            device.type,
            dtype,
            f" (flash: {reason})" if reason else "",
        )
        return chosen
    reason = unavailable_reason(requested, device, dtype, masked)
    if reason is not None:
        raise ConfigError(f"model.arch.attention_backend={requested} cannot run: {reason}")
    log.info("attention backend %s on %s %s", requested, device.type, dtype)
    return requested


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    attention_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, H, Tk, D] -> [B, H, Tq, D].

    attention_mask: boolean (True = attend), broadcastable to [B, H, Tq, Tk]; None means causal,
    aligned so that the queries are the last Tq of the Tk positions (a KV cache).
    """
    backend = resolve_backend(backend, q.device, q.dtype, attention_mask is not None)
    if backend == "flash":
        return _flash(q, k, v, dropout_p)
    if backend == "te":
        return _transformer_engine(q, k, v, dropout_p)
    if attention_mask is None and q.shape[2] != k.shape[2]:
        attention_mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if backend == "math":
        return math_attention(q, k, v, attention_mask, dropout_p)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, is_causal=attention_mask is None
    )


def math_attention(q, k, v, attention_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The reference: softmax(Q K^T / sqrt(D) + mask) V in fp32, result in q's dtype."""
    if attention_mask is None:
        attention_mask = causal_mask(q.shape[2], k.shape[2], q.device)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
    return (probs @ v.float()).to(q.dtype)


def _flash(q, k, v, dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn takes [B, T, H, D]; its causal mask is aligned bottom-right (flash-attn >= 2.1),
    # which is what a KV cache needs.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=True)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _te_module(heads: int, head_dim: int, dropout_p: float):
    """One TE DotProductAttention per shape, kept outside the model so no parameter or state name changes."""
    import transformer_engine.pytorch as te

    return te.DotProductAttention(
        num_attention_heads=heads,
        kv_channels=head_dim,
        attention_dropout=dropout_p,
        qkv_format="bshd",
        attn_mask_type="causal",
    )


def _transformer_engine(q, k, v, dropout_p: float) -> torch.Tensor:
    bsz, heads, n_q, head_dim = q.shape
    module = _te_module(heads, head_dim, dropout_p)
    mask_type = "causal" if n_q == k.shape[2] else "causal_bottom_right"
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = module(q, k, v, attn_mask_type=mask_type)
    return out.view(bsz, n_q, heads, head_dim).transpose(1, 2)  # TE returns [B, T, H * D]
