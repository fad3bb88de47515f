"""Autoregressive generation with a KV cache: greedy, or sampled with temperature and top-p,
with an optional repetition penalty (CTRL-style, as in Hugging Face `generate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from flm_lightning.errors import ConfigError
from flm_lightning.model import FLMTransformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_id: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of tokens already in `seen` [B, T] by `penalty`."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def generate(model: FLMTransformer, prompt: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """prompt [B, T] -> [B, T + n] token ids. Padded vocabulary entries are never produced."""
    model.eval()
    total = prompt.shape[1] + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        raise ConfigError(
            f"prompt ({prompt.shape[1]}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
            f"max_seq_len ({model.config.max_seq_len})"
        )
    generator = torch.Generator(device=prompt.device).manual_seed(cfg.seed)
    cache = model.new_kv_cache()
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    logits = model(prompt, kv_cache=cache)[:, -1]
    for step in range(cfg.max_new_tokens):
        logits = logits[:, : model.config.vocab_size].float()
        logits = apply_repetition_penalty(logits, tokens, cfg.repetition_penalty)
        if cfg.temperature == 0:
            next_token = logits.argmax(-1)
        else:
            probs = top_p_filter(logits / cfg.temperature, cfg.top_p).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        if cfg.eos_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, cfg.eos_id), next_token)
            finished |= next_token == cfg.eos_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if step == cfg.max_new_tokens - 1 or bool(finished.all()):
            break
        logits = model(next_token[:, None], kv_cache=cache)[:, -1]
    return tokens
