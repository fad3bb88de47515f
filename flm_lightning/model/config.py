"""The one model configuration, validated at construction (Megatron-Core's TransformerConfig idea).

Both families are points in this space:
- FLM-101B: LayerNorm, GeLU (4d), biases, xPos, tied embedding/head, output temperature.
- Tele-FLM: RMSNorm (eps 1e-6), SwiGLU (about 8/3 d), no biases, RoPE, untied, input/output multipliers.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal, Optional, get_args

from flm_lightning.errors import ConfigError
from flm_lightning.model.attention import AttentionBackend

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "swiglu"]
Position = Literal["rope", "xpos"]
NORMS, ACTIVATIONS, POSITIONS = get_args(Norm), get_args(Activation), get_args(Position)
# xPos scales q by zeta^((n-c)/B) and k by its inverse, centre c = max_seq_len // 2; the steepest pair
# has zeta = 0.4/1.4, so the largest factor is e^(XPOS_LOG_DECAY * (max_seq_len - c) / B). fp32 ends at
# e^88.7: XPOS_MAX_LOG_SCALE leaves e^8 of headroom for the magnitude of q and k themselves.
XPOS_LOG_DECAY = math.log(1.4 / 0.4)
XPOS_MAX_LOG_SCALE = 80.0


@dataclass
class ModelConfig:
    """Architecture of a decoder-only FLM model (each field's docstring below says what it sets)."""

    vocab_size: int = 2048
    """Tokenizer vocabulary size; the embedding is padded up to `pad_vocab_multiple`."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    hidden_size: int = 256
    """Model width d."""
    head_dim: Optional[int] = None
    """Per-head width; default hidden_size // n_heads. Set it explicitly to let n_heads * head_dim differ
    from hidden_size (e.g. after head growth)."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner width; default 4d (gelu) or 8/3 d rounded up to 64 (swiglu)."""
    norm: Norm = "rmsnorm"
    """LayerNorm (FLM-101B) or RMSNorm (Tele-FLM)."""
    norm_eps: float = 1e-6
    """Epsilon of the norms."""
    activation: Activation = "swiglu"
    """"gelu" (tanh approximation, 2 matrices) or "swiglu" (3 matrices)."""
    bias: bool = False
    """Biases in linear layers (and LayerNorm shift)."""
    position: Position = "rope"
    """"rope" or "xpos" (rotary with per-pair decay)."""
    rope_theta: float = 10000.0
    """Rotary base."""
    xpos_scale_base: float = 512.0
    """xPos scale base B."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the output head."""
    input_mult: float = 1.0
    """Multiplier on the embedding output."""
    output_mult: float = 1.0
    """Multiplier on the logits, divided by width_mult as in μP (`logit_scale`)."""
    base_hidden_size: Optional[int] = None
    """μP base width, the run's one: width_mult = hidden_size / base_hidden_size (default 1)."""
    max_seq_len: int = 2048
    """Longest sequence the position tables cover (positions 0 .. max_seq_len - 1). With xPos it must keep
    the scales inside fp32: (max_seq_len - max_seq_len // 2) * ln(3.5) / xpos_scale_base <= 80, i.e. at
    most about 127 * xpos_scale_base positions (ConfigError otherwise)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    init_std: float = 0.02
    """Std of the normal initialisation (output projections also / sqrt(2 n_layers))."""
    pad_vocab_multiple: int = 64
    """Pad the embedding rows to a multiple of this (64/128 for fast kernels)."""
    attention_backend: AttentionBackend = "sdpa"
    """The attention kernel: "sdpa" (default), "math" (reference), "flash" (flash-attn), "te" (Transformer
    Engine) or "auto" (flash when it can run, else sdpa). It does not change the function, so it is not a
    function field."""

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("vocab_size", "n_layers", "n_heads", "hidden_size", "max_seq_len", "pad_vocab_multiple"):
            _require_positive(name, getattr(self, name))
        for name in ("head_dim", "ffn_hidden_size", "base_hidden_size"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        for name in ("norm_eps", "rope_theta", "xpos_scale_base", "input_mult", "output_mult"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.arch.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.arch.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std < 0:
            raise ConfigError(f"model.arch.init_std must be >= 0, got {self.init_std}")
        if self.head_dim is None and self.hidden_size % self.n_heads:
            raise ConfigError(
                f"model.arch.hidden_size ({self.hidden_size}) is not divisible by model.arch.n_heads "
                f"({self.n_heads}); change one of them or set model.arch.head_dim explicitly"
            )
        if self.head_size % 2:
            raise ConfigError(f"model.arch.head_dim must be even for rotary positions, got {self.head_size}")
        if self.position == "xpos" and self.xpos_max_log_scale > XPOS_MAX_LOG_SCALE:
            half = self.max_seq_len - self.max_seq_len // 2
            longest = 2 * math.floor(XPOS_MAX_LOG_SCALE * self.xpos_scale_base / XPOS_LOG_DECAY)
            smallest_base = math.ceil(half * XPOS_LOG_DECAY / XPOS_MAX_LOG_SCALE)
            raise ConfigError(
                f"model.arch.max_seq_len ({self.max_seq_len}) is too long for xPos with xpos_scale_base "
                f"{self.xpos_scale_base}: its position scales would reach e^{self.xpos_max_log_scale:.1f}, too close "
                f"to the fp32 limit e^88.7; use max_seq_len <= {longest} or xpos_scale_base >= {smallest_base}"
            )

    # Derived sizes are properties, never stored: a config edited with dataclasses.replace
    # (or by a CLI override of hidden_size) must not keep a stale head_dim or ffn size.
    @property
    def head_size(self) -> int:
        """head_dim, or hidden_size // n_heads when unset."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.n_heads

    @property
    def ffn_size(self) -> int:
        """ffn_hidden_size, or the family default (4d for gelu, 8/3 d rounded up to 64 for swiglu)."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return default_ffn_hidden_size(self.hidden_size, self.activation)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def attention_dim(self) -> int:
        return self.n_heads * self.head_size

    @property
    def xpos_max_log_scale(self) -> float:
        """Natural log of the largest xPos factor on q or k over positions 0 .. max_seq_len - 1."""
        return (self.max_seq_len - self.max_seq_len // 2) * XPOS_LOG_DECAY / self.xpos_scale_base

    @property
    def width_mult(self) -> float:
        """μP's width multiplier r = hidden_size / base_hidden_size (1 without a base width)."""
        return self.hidden_size / (self.base_hidden_size or self.hidden_size)

    @property
    def logit_scale(self) -> float:
        """The factor on the logits, output_mult / width_mult: the one definition used by the model, its
        pipeline stages, the growth operators and the Hugging Face conversion."""
        return self.output_mult / self.width_mult

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def function_fields(self) -> dict[str, Any]:
        """The fields that decide what a given set of weights computes (derived sizes resolved);
        two configs with equal function fields can exchange weights."""
        values = self.to_dict()
        values.update(head_dim=self.head_size, ffn_hidden_size=self.ffn_size)
        for not_function in ("dropout", "init_std", "attention_backend"):  # training-only or kernel choice
            values.pop(not_function)
        return values

    def differences(self, other: "ModelConfig") -> str:
        """The function fields where `self` (a checkpoint's) and `other` (the config's) differ, in words."""
        ours, theirs = other.function_fields(), self.function_fields()
        return ", ".join(
            f"{k} is {v} in the checkpoint, {ours[k]} in the config" for k, v in theirs.items() if ours[k] != v
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model.arch has unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def _check_types(config: ModelConfig) -> None:
    """Reject wrongly typed values (a YAML typo such as `n_layers: 4x`) with the field's name."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        if value is None and optional:
            continue
        if typing.get_origin(base) is Literal:  # a choice: one of the Literal's values
            _require_choice(f.name, value, get_args(base))
            continue
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
        elif not isinstance(value, base) or (base is int and isinstance(value, bool)):
            raise ConfigError(f"model.arch.{f.name} must be of type {base.__name__}, got {value!r}")


def default_ffn_hidden_size(hidden_size: int, activation: str) -> int:
    if activation == "gelu":
        return 4 * hidden_size
    return (8 * hidden_size // 3 + 63) // 64 * 64


def _require_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"model.arch.{name} must be a positive integer, got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model.arch.{name} must be one of {list(choices)}, got {value!r}")


def coerce_config(value: Any, cls):
    """`value` (an instance of `cls`, a mapping or another dataclass) as a `cls`; ConfigError otherwise."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
    if is_dataclass(value):
        return cls(**asdict(value))
    raise ConfigError(f"expected a {cls.__name__} or a mapping, got {type(value).__name__}")
