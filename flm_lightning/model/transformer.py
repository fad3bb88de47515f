"""The FLM decoder: one module for both families, chosen by `ModelConfig`.

torchtitan layout: `tok_embeddings`, `layers` (a ModuleDict keyed by layer index, so names
survive pipeline splitting), `norm`, `output`. A pipeline stage may set `tok_embeddings`,
`norm` or `output` to None and still run.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from flm_lightning.errors import ConfigError
from flm_lightning.model.config import ModelConfig
from flm_lightning.model.layers import LayerKVCache, RotaryEmbedding, TransformerBlock, make_norm, residual_init_std

RESIDUAL_OUTPUTS = ("attention.wo", "feed_forward.w2")


class FLMTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config) for i in range(config.n_layers)})
        self.norm: Optional[nn.Module] = make_norm(config)
        self.output: Optional[nn.Linear] = (
            None if config.tie_embeddings else nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal matrices (residual outputs scaled by 1/sqrt(2L)), zero biases, unit norms."""
        std, out_std = self.config.init_std, residual_init_std(self.config)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                s = out_std if name.endswith(RESIDUAL_OUTPUTS) else std
                nn.init.trunc_normal_(module.weight, 0.0, s, -3 * s, 3 * s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, 0.0, std, -3 * std, 3 * std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        self.rotary.reset_tables()

    def init_std(self, name: str) -> Optional[float]:
        """The std `init_weights` draws parameter `name` with; None for norm weights and biases."""
        if name.endswith("bias") or name.rsplit(".", 1)[0].endswith("norm"):
            return None
        return (
            residual_init_std(self.config)
            if name.endswith(tuple(f"{r}.weight" for r in RESIDUAL_OUTPUTS))
            else self.config.init_std
        )

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[dict[str, LayerKVCache]] = None,
    ) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, d] on a later pipeline stage) -> logits [B, T, V_padded].

        attention_mask: optional boolean [B, 1, T, T] (True = attend), e.g. causal within documents;
        None means plain causal attention.
        kv_cache: for incremental decoding, one `LayerKVCache` per layer name (see `new_kv_cache`);
        positions then continue after the cached ones.
        position_ids: optional [T] or [B, T] positions, each below max_seq_len (default: 0, 1, ...
        after any cached positions).
        Raises ConfigError when the cached plus new positions exceed `config.max_seq_len`.
        """
        cfg = self.config
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if cfg.input_mult != 1.0:
                h = h * cfg.input_mult
        else:
            h = tokens
        if position_ids is None:
            # Every position from the first new one on: attention takes as many as its queries. Under
            # sequence parallelism h holds a slice of the sequence, so its length is not the query count.
            start = next(iter(kv_cache.values())).length if kv_cache else 0
            if start + h.shape[1] > cfg.max_seq_len:
                cached = f" after {start} cached" if start else ""
                raise ConfigError(
                    f"the input holds {h.shape[1]} positions{cached}, more than model.arch.max_seq_len "
                    f"({cfg.max_seq_len}) allows; shorten it or use a model with a longer max_seq_len"
                )
            position_ids = torch.arange(start, max(self.config.max_seq_len, start + h.shape[1]), device=h.device)
        tables = self.rotary(position_ids)
        for name, layer in self.layers.items():
            h = layer(h, tables, attention_mask, kv_cache[name] if kv_cache is not None else None)
        if self.norm is not None:
            h = self.norm(h)
        return self.logits(h)

    def new_kv_cache(self) -> dict[str, LayerKVCache]:
        return {name: LayerKVCache() for name in self.layers}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            logits = self.output(h)
        elif self.config.tie_embeddings and self.tok_embeddings is not None:
            logits = F.linear(h, self.tok_embeddings.weight)
        else:
            return h  # a pipeline stage without the head
        scale = self.config.logit_scale
        return logits * scale if scale != 1.0 else logits
