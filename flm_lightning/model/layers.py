"""Building blocks of the decoder: positions, norms, attention, MLPs, the block.

Plain single-device PyTorch. Submodule names (wq/wk/wv/wo, w1/w2/w3, attention_norm,
ffn_norm) are stable: tensor-parallel plans, pipeline splits, growth operators and the
Hugging Face adapter address parameters by them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flm_lightning.model.attention import attend
from flm_lightning.model.config import ModelConfig

PositionTables = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class RotaryEmbedding(nn.Module):
    """RoPE or xPos tables (non-persistent fp32 buffers), in the rotate-half layout of Llama.

    xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"; docs/design.md, "Model"): pair j
    of a head of width D gets zeta_j = (2j/D + 0.4) / 1.4; a query at position n is scaled by zeta^((n-c)/B), a key at
    position m by zeta^(-(m-c)/B), so the score carries zeta^((n-m)/B). The centre
    c = max_seq_len // 2 cancels in every score; it keeps each factor within e^(+-80) over every
    position the config allows (`ModelConfig` refuses a max_seq_len for which it would not). The
    factors are computed as exp((n - c) / B * ln zeta) in fp64, so none is ever infinite.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_size
        self.theta = config.rope_theta
        self.max_seq_len = config.max_seq_len
        self.xpos_scale_base = config.xpos_scale_base if config.position == "xpos" else None
        self.register_buffer("cos", torch.empty(config.max_seq_len, config.head_size), persistent=False)
        self.register_buffer("sin", torch.empty(config.max_seq_len, config.head_size), persistent=False)
        self.register_buffer("xpos_scale", torch.empty(config.max_seq_len, config.head_size), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        if self.cos.is_meta:
            return
        device = self.cos.device
        half = self.head_dim // 2
        pair = torch.arange(half, dtype=torch.float64, device=device)
        inv_freq = self.theta ** (-2.0 * pair / self.head_dim)
        pos = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)
        angles = torch.outer(pos, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())
        if self.xpos_scale_base is not None:
            log_zeta = torch.log((2.0 * pair / self.head_dim + 0.4) / 1.4)
            power = (pos - self.max_seq_len // 2) / self.xpos_scale_base
            scale = torch.exp(torch.outer(power, log_zeta))
            self.xpos_scale.copy_(torch.cat([scale, scale], dim=-1))
        else:
            self.xpos_scale.fill_(1.0)

    def forward(self, position_ids: torch.Tensor) -> PositionTables:
        """Tables for `position_ids` ([T] or [B, T], each in 0 .. max_seq_len - 1) shaped to broadcast
        over [B, H, T, D]: cos, sin and the xPos scale (None for RoPE), fp32."""
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        cos = self.cos[position_ids][:, None]
        sin = self.sin[position_ids][:, None]
        scale = self.xpos_scale[position_ids][:, None] if self.xpos_scale_base is not None else None
        return cos, sin, scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, tables: PositionTables) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (fp32 math, result in the input dtype); xPos scales q up and k down."""
    cos, sin, scale = tables
    seq = q.shape[2]  # tables may cover more positions (see FLMTransformer.forward); use the first seq
    cos, sin, scale = cos[..., :seq, :], sin[..., :seq, :], scale[..., :seq, :] if scale is not None else None
    qf, kf = q.float(), k.float()
    q_out = qf * cos + rotate_half(qf) * sin
    k_out = kf * cos + rotate_half(kf) * sin
    if scale is not None:
        q_out = q_out * scale
        k_out = k_out / scale
    return q_out.to(q.dtype), k_out.to(k.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class LayerKVCache:
    """Keys and values of the positions seen so far by one attention layer (inference only)."""

    def __init__(self) -> None:
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head causal self-attention; the kernel is `config.attention_backend` (see `attention.py`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, inner = config.hidden_size, config.attention_dim
        self.head_dim = config.head_size
        self.dropout = config.dropout
        self.backend = config.attention_backend
        self.wq = nn.Linear(d, inner, bias=config.bias)
        self.wk = nn.Linear(d, inner, bias=config.bias)
        self.wv = nn.Linear(d, inner, bias=config.bias)
        self.wo = nn.Linear(inner, d, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        tables: PositionTables,
        attention_mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, tables)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # new queries also see every cached key (causal, bottom-right)
        out = attend(q, k, v, self.backend, attention_mask, self.dropout if self.training else 0.0)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class GeluMLP(nn.Module):
    """FLM-101B MLP: w2(gelu(w1 x)), tanh-approximate GeLU as in Megatron's fused kernel."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.ffn_size, bias=config.bias)
        self.w2 = nn.Linear(config.ffn_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Tele-FLM MLP: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection (Llama names)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.ffn_size, bias=config.bias)
        self.w3 = nn.Linear(config.hidden_size, config.ffn_size, bias=config.bias)
        self.w2 = nn.Linear(config.ffn_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(config)
        self.attention = Attention(config)
        self.ffn_norm = make_norm(config)
        self.feed_forward = SwiGLUMLP(config) if config.activation == "swiglu" else GeluMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        tables: PositionTables,
        attention_mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        h = x + self.dropout(self.attention(self.attention_norm(x), tables, attention_mask, kv_cache))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


def residual_init_std(config: ModelConfig) -> float:
    """Std of residual output projections (wo, w2): init_std / sqrt(2 L) (GPT-2 / Megatron)."""
    return config.init_std / math.sqrt(2 * config.n_layers)
