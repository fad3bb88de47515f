"""μP (maximal update parametrization) as one object derived from the config (docs/mup.md, docs/design.md "μP").

Every parameter gets a role from its name alone (no shape bookkeeping stored on parameters,
which is what breaks microsoft/mup under FSDP), and the role decides its initialisation and its
AdamW learning rate at width multiplier r = hidden_size / base_hidden_size:

| role | parameters | init std | AdamW LR |
|---|---|---|---|
| embedding | tok_embeddings.weight | std | lr |
| hidden | wq, wk, wv, w1, w3 | matrix_std / sqrt(r) | matrix_lr / r |
| residual_out | wo, w2 | matrix_std / sqrt(r) / sqrt(2 L) | matrix_lr / r |
| readout | output.weight | std | lr |
| vector | norms, biases | ones / zeros | lr |

The forward multipliers are the model's own: embeddings times input_mult, logits times
`ModelConfig.logit_scale` (output_mult / r). The base width lives in one place,
`ModelConfig.base_hidden_size`, which gives r (`ModelConfig.width_mult`) to the forward and to
these rules alike; `model.mup.base_hidden_size` may give it instead (`with_base_width` moves it
there). Everything is a function of the config, so after a width growth the same object built
for the new config re-derives every rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig

ROLES = ("embedding", "hidden", "residual_out", "readout", "vector")


@dataclass
class MuPConfig:
    """μP hyper-parameters, as searched on a proxy of width `base_hidden_size`."""

    base_hidden_size: Optional[int] = None
    """The proxy's width (r = 1 there); default: model.arch.base_hidden_size, the one place the run reads
    it from. Given here, it fills an unset model.arch.base_hidden_size."""
    std: float = 0.02
    """Init std of the embedding and the readout."""
    matrix_std: float = 0.02
    """Init std of hidden matrices at the base width."""
    matrix_lr: Optional[float] = None
    """AdamW LR of hidden matrices at the base width (default: model.optim.lr)."""

    def __post_init__(self) -> None:
        if self.base_hidden_size is not None and self.base_hidden_size <= 0:
            raise ConfigError(f"model.mup.base_hidden_size must be > 0, got {self.base_hidden_size}")
        for name in ("std", "matrix_std"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.mup.{name} must be >= 0, got {getattr(self, name)}")
        if self.matrix_lr is not None and self.matrix_lr <= 0:
            raise ConfigError(f"model.mup.matrix_lr must be > 0, got {self.matrix_lr}")


def role(name: str) -> str:
    """The μP role of a parameter, from its name in `FLMTransformer`."""
    module = name.rsplit(".", 1)[0]
    if name.endswith("bias") or module.endswith("norm"):
        return "vector"
    if name.startswith("tok_embeddings"):
        return "embedding"
    if name.startswith("output"):
        return "readout"
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return "residual_out"
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
        return "hidden"
    raise ConfigError(f"μP has no role for parameter {name!r}")


class MuP:
    """The μP rules of `arch` (its base width `arch.base_hidden_size`) with the hyper-parameters `config`."""

    def __init__(self, config: MuPConfig, arch: ModelConfig, lr: float):
        if arch.base_hidden_size is None:
            raise ConfigError("μP needs a base width: set model.arch.base_hidden_size (or model.mup.base_hidden_size)")
        if config.base_hidden_size not in (None, arch.base_hidden_size):
            raise ConfigError(
                f"model.arch.base_hidden_size ({arch.base_hidden_size}) must equal model.mup.base_hidden_size "
                f"({config.base_hidden_size}): the logit multiplier output_mult / r uses it"
            )
        self.config, self.arch, self.lr = config, arch, lr
        self.width_mult = arch.width_mult

    def init_std(self, name: str) -> Optional[float]:
        """Init std of a matrix parameter; None for vector-like ones (ones / zeros)."""
        r, c = self.width_mult, self.config
        kind = role(name)
        if kind in ("embedding", "readout"):
            return c.std
        if kind == "hidden":
            return c.matrix_std / math.sqrt(r)
        if kind == "residual_out":
            return c.matrix_std / math.sqrt(r) / math.sqrt(2 * self.arch.n_layers)
        return None

    def learning_rate(self, name: str) -> float:
        matrix_lr = self.config.matrix_lr or self.lr
        return matrix_lr / self.width_mult if role(name) in ("hidden", "residual_out") else self.lr

    @torch.no_grad()
    def initialize(self, model: nn.Module) -> None:
        """Truncated-normal (±3σ) matrices at their μP std; norms to ones, biases to zeros."""
        for name, param in model.named_parameters():
            std = self.init_std(name)
            if std is not None:
                nn.init.trunc_normal_(param, 0.0, std, -3 * std, 3 * std)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.ones_(param)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """One AdamW group per (role, LR): matrices decay, vector-like parameters do not."""
        groups: dict[str, dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            kind = role(name)
            group = groups.setdefault(
                kind,
                {
                    "params": [],
                    "name": f"mup_{kind}",
                    "lr": self.learning_rate(name),
                    "weight_decay": 0.0 if kind == "vector" else weight_decay,
                },
            )
            group["params"].append(param)
        return [groups[k] for k in ROLES if k in groups]


def with_base_width(arch: ModelConfig, config: Optional[MuPConfig]) -> ModelConfig:
    """`arch` with μP's base width: model.mup.base_hidden_size fills model.arch.base_hidden_size when that
    is unset (the one place the two are reconciled; from then on only the arch's is read); checks the pairing.

    Raises:
        ConfigError: no base width on either side, or model.arch.base_hidden_size is set and differs from
            model.mup.base_hidden_size.
    """
    if config is None:
        return arch
    if arch.base_hidden_size is None and config.base_hidden_size is not None:
        arch = replace(arch, base_hidden_size=config.base_hidden_size)
    MuP(config, arch, 1.0)  # a bad pairing fails here
    return arch
