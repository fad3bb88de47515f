"""Parameter and FLOP counts of a config, computed on the meta device (no weights allocated)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from flm_lightning.model.config import ModelConfig
from flm_lightning.model.transformer import FLMTransformer


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    embedding_parameters: int
    non_embedding_parameters: int
    matmul_parameters: int
    seq_len: int
    flops_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)


def build_meta_model(config: ModelConfig) -> FLMTransformer:
    with torch.device("meta"):
        return FLMTransformer(config)


def count_model(config: ModelConfig, seq_len: Optional[int] = None) -> ModelSize:
    """Counts on the meta device; FLOPs per token are for one training step (forward + backward).

    flops_per_token = 6 * matmul_parameters + 12 * n_layers * attention_dim * seq_len, where
    matmul_parameters are all Linear weights plus the output head (the tied embedding counts
    there because the head is a matmul with it), and the second term is QK^T and AV (2 matmuls,
    2 FLOPs per multiply-add, x3 for backward), without the causal halving, as in the Megatron
    and PaLM MFU convention.
    """
    seq_len = seq_len or config.max_seq_len
    model = build_meta_model(config)
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if config.tie_embeddings:
        matmul += embedding
    attention = 12 * config.n_layers * config.attention_dim * seq_len
    return ModelSize(
        parameters=parameters,
        embedding_parameters=embedding,
        non_embedding_parameters=parameters - embedding,
        matmul_parameters=matmul,
        seq_len=seq_len,
        flops_per_token=6 * matmul + attention,
    )
