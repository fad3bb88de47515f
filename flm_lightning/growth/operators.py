"""Masked structural growth (MSG) of an `FLMTransformer`: pure functions, no Lightning.

A growth event takes a model of config A to config B (any of: wider FFN, more heads at a fixed
head_dim, wider hidden size, more layers; several at once):

1. `grow_model` builds B with its own initialisation for the new slices, copies every old
   tensor into the leading block of its enlarged counterpart and places old or copied layers
   at the positions of a layer `order` (see `layer_order`).
2. `GrowthMasks` hides the new structure behind masks with value m (0 -> 1 over a ramp):
   FFN units and heads are scaled by m before the output projection; new hidden coordinates
   by m at the embedding and at every residual branch output, with every norm computing its
   statistics over the coordinates weighted by the mask; new layers add m * branch. At m = 0 the
   function of A is reproduced exactly whatever the new weights are. The masks are forward
   hooks, so parameter names never change; `remove()` folds them away when m reaches 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from flm_lightning.errors import ConfigError
from flm_lightning.model import FLMTransformer, ModelConfig

LayerSource = Union[int, str]  # an old layer kept here (int), "copy:K" (new copy of old K) or "random"
# The choices of the operators, read by GrowthSpec (and so by GrowthCallback stages and the grow tool's
# options): a new operator is added here (and in its test) only.
DepthMode = Literal["stack", "interleave"]
"""Where new layers go: on top ("stack") or right after their source layer ("interleave")."""
DepthInit = Literal["copy", "random"]
"""New layers are copies of existing ones ("copy") or freshly initialised ("random")."""
DEPTH_MODES, DEPTH_INITS = get_args(DepthMode), get_args(DepthInit)
GROWABLE = ("n_layers", "n_heads", "hidden_size", "ffn_hidden_size")


def check_growth(old: ModelConfig, new: ModelConfig) -> None:
    """Raise ConfigError, before anything changes, if `new` is not a growth of `old`."""
    for name in ("n_layers", "n_heads", "hidden_size"):
        if getattr(new, name) < getattr(old, name):
            raise ConfigError(f"growth cannot shrink {name}: {getattr(old, name)} -> {getattr(new, name)}")
    if new.ffn_size < old.ffn_size:
        raise ConfigError(f"growth cannot shrink ffn_hidden_size: {old.ffn_size} -> {new.ffn_size}")
    if new.head_size != old.head_size:
        raise ConfigError(
            f"head growth keeps head_dim fixed ({old.head_size}); set head_dim: {old.head_size} in the target "
            f"(n_heads {new.n_heads} x head_dim {old.head_size} need not equal hidden_size)"
        )
    changed = {
        f.name
        for f in old.__dataclass_fields__.values()
        if f.name not in GROWABLE + ("head_dim", "base_hidden_size", "max_seq_len")
        and getattr(old, f.name) != getattr(new, f.name)
    }
    if changed:
        raise ConfigError(f"growth may change only {list(GROWABLE)}; the target also changes {sorted(changed)}")
    if new.max_seq_len < old.max_seq_len:
        raise ConfigError(f"growth cannot shrink max_seq_len: {old.max_seq_len} -> {new.max_seq_len}")
    if new.tie_embeddings and old.logit_scale != new.logit_scale:
        raise ConfigError(
            "a tied model cannot grow its width under a μP output multiplier (the head cannot be rescaled)"
        )
    if new.function_fields() == old.function_fields():
        raise ConfigError("the growth target equals the current model: nothing grows")


def layer_order(
    n_old: int,
    n_new: int,
    mode: DepthMode = "stack",
    init: DepthInit = "copy",
    order: Optional[list[LayerSource]] = None,
) -> list[LayerSource]:
    """Where each layer of the grown model comes from.

    stack: old layers first, then new ones copying layers 0, 1, ... (cyclically);
    interleave: each of the first n_new - n_old old layers is followed by its copy;
    an explicit `order` (e.g. [0, 1, "copy:1", 2, 3, "random"]) is validated and used as is.
    init "random" makes new layers fresh instead of copies.
    """
    if order is not None:
        sources = list(order)
    elif mode == "stack":
        sources = list(range(n_old)) + [f"copy:{i % n_old}" for i in range(n_new - n_old)]
    elif mode == "interleave":
        extra = n_new - n_old
        sources = []
        for i in range(n_old):
            sources.append(i)
            if i < extra:
                sources.append(f"copy:{i}")
        sources += [f"copy:{i % n_old}" for i in range(max(0, extra - n_old))]
    else:
        raise ConfigError(f"depth mode must be one of {list(DEPTH_MODES)}, got {mode!r}")
    if init == "random":
        sources = [s if isinstance(s, int) else "random" for s in sources]
    elif init not in DEPTH_INITS:
        raise ConfigError(f"depth init must be one of {list(DEPTH_INITS)}, got {init!r}")
    kept = [s for s in sources if isinstance(s, int)]
    if len(sources) != n_new:
        raise ConfigError(f"layer order has {len(sources)} entries for n_layers {n_new}")
    if sorted(kept) != list(range(n_old)):
        raise ConfigError(f"layer order must keep every old layer 0..{n_old - 1} exactly once, got {kept}")
    if kept != sorted(kept):
        raise ConfigError("layer order must keep the old layers in their original order")
    for s in sources:
        if not isinstance(s, int) and s != "random" and not re.fullmatch(r"copy:([0-9]+)", str(s)):
            raise ConfigError(f"layer order entry {s!r} is not an old index, 'copy:K' or 'random'")
        if isinstance(s, str) and s.startswith("copy:") and int(s[5:]) >= n_old:
            raise ConfigError(f"layer order entry {s!r} copies a layer that does not exist")
    return sources


def _copy_leading(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst[tuple(slice(0, n) for n in src.shape)] = src


@torch.no_grad()
def grow_model(
    model: FLMTransformer, new_config: ModelConfig, sources: list[LayerSource], seed: int = 0, initialize=None
) -> tuple[FLMTransformer, dict[str, Optional[str]]]:
    """The grown network and, for every new parameter name, the old parameter it came from (or None).
    The caller (`grow`) has checked that `new_config` is a growth of `model.config`.

    New slices and "random" layers keep the initialisation of `FLMTransformer(new_config)`, or
    of `initialize(model)` when given (the μP init), seeded by `seed`; old values overwrite the
    leading blocks.
    """
    devices = {p.device for p in model.parameters()}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            grown = FLMTransformer(new_config)
        if initialize is not None:
            initialize(grown)
    old_params = dict(model.named_parameters())
    origin: dict[str, Optional[str]] = {}
    for name, param in grown.named_parameters():
        src_name = _source_name(name, sources)
        origin[name] = src_name
        if src_name is not None:
            _copy_leading(param, old_params[src_name].to(param.dtype))
    return grown.train(model.training), origin


def _source_name(name: str, sources: list[LayerSource]) -> Optional[str]:
    match = re.match(r"layers\.(\d+)\.(.*)", name)
    if not match:
        return name
    source = sources[int(match.group(1))]
    if source == "random":
        return None
    index = source if isinstance(source, int) else int(str(source)[5:])
    return f"layers.{index}.{match.group(2)}"


def new_layer_positions(sources: list[LayerSource]) -> list[int]:
    return [i for i, s in enumerate(sources) if not isinstance(s, int)]


# ---- masks --------------------------------------------------------------------------------
def masked_norm(norm: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """LayerNorm / RMSNorm whose statistics weight coordinate i by c_i (sum(c) as the count),
    output multiplied by c. With c all ones it is the plain norm."""
    xf = x.float()
    count = c.sum()
    weight, bias = (_local_parameter(getattr(norm, name, None)) for name in ("weight", "bias"))
    if isinstance(norm, nn.LayerNorm):
        mean = (xf * c).sum(-1, keepdim=True) / count
        var = (((xf - mean) ** 2) * c).sum(-1, keepdim=True) / count
        y = (xf - mean) * torch.rsqrt(var + norm.eps)
    else:
        ms = (xf * xf * c).sum(-1, keepdim=True) / count
        y = xf * torch.rsqrt(ms + (norm.eps if norm.eps is not None else torch.finfo(xf.dtype).eps))
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return (y * c).to(x.dtype)


def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local values of a tensor-parallel (DTensor) activation; plain tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def _local_parameter(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A replicated norm parameter applied to this rank's slice of the sequence: its gradient from
    here is a partial sum over the tensor-parallel ranks (reduced by DTensor, as for an unmasked norm)."""
    if isinstance(p, DTensor):
        return p.to_local(grad_placements=[Partial()] * p.device_mesh.ndim)
    return p


@dataclass
class MaskPlan:
    """What one growth event hides; serialisable, so a checkpoint taken mid-ramp restores the masks."""

    old_hidden: int
    new_hidden: int
    old_heads: int
    new_heads: int
    head_dim: int
    old_ffn: int
    new_ffn: int
    new_layers: list[int]

    @classmethod
    def between(cls, old: ModelConfig, new: ModelConfig, sources: list[LayerSource]) -> "MaskPlan":
        return cls(
            old.hidden_size,
            new.hidden_size,
            old.n_heads,
            new.n_heads,
            new.head_size,
            old.ffn_size,
            new.ffn_size,
            new_layer_positions(sources),
        )


class GrowthMasks:
    """Forward hooks that apply one growth event's masks at value `m`; `remove()` folds them.

    Under tensor parallelism the FFN and head masks are cut to rank `tp_rank`'s contiguous slice
    of the columns; hidden-size masks act on full-width activations.
    """

    def __init__(self, model: FLMTransformer, plan: MaskPlan, m: float = 0.0, tp_rank: int = 0):
        self.plan = plan
        self.m = m
        self.tp_rank = tp_rank
        self._handles = []
        p = plan
        hook = self._handles.append
        if p.new_ffn > p.old_ffn:
            for layer in model.layers.values():
                hook(layer.feed_forward.w2.register_forward_pre_hook(self._scale_input(p.old_ffn)))
        if p.new_heads > p.old_heads:
            for layer in model.layers.values():
                hook(layer.attention.wo.register_forward_pre_hook(self._scale_input(p.old_heads * p.head_dim)))
        if p.new_hidden > p.old_hidden:
            if model.tok_embeddings is not None:
                hook(model.tok_embeddings.register_forward_hook(self._scale_output(p.old_hidden)))
            for layer in model.layers.values():
                hook(layer.attention.register_forward_hook(self._scale_output(p.old_hidden)))
                hook(layer.feed_forward.register_forward_hook(self._scale_output(p.old_hidden)))
                hook(layer.attention_norm.register_forward_hook(self._norm()))
                hook(layer.ffn_norm.register_forward_hook(self._norm()))
            if model.norm is not None:
                hook(model.norm.register_forward_hook(self._norm()))
        for index in p.new_layers:
            if str(index) not in model.layers:
                continue  # held by another pipeline stage
            layer = model.layers[str(index)]
            hook(layer.attention.register_forward_hook(self._scale_branch()))
            hook(layer.feed_forward.register_forward_hook(self._scale_branch()))

    def _vector(self, n_old: int, n: int, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """1 for the n_old old coordinates, m for new ones, over coordinates offset .. offset + n."""
        c = torch.ones(n, dtype=torch.float32, device=like.device)
        c[max(n_old - offset, 0) :] = self.m
        return c

    def _scale_input(self, n_old: int):
        def pre_hook(module, args):
            x = _local(args[0])  # under tensor parallelism: this rank's slice of the columns
            y = x * self._vector(n_old, x.shape[-1], x, offset=self.tp_rank * x.shape[-1]).to(x.dtype)
            if isinstance(args[0], DTensor):
                y = DTensor.from_local(y, args[0].device_mesh, args[0].placements)
            return (y,) + tuple(args[1:])

        return pre_hook

    def _scale_output(self, n_old: int):
        def hook(module, args, out):
            return out * self._vector(n_old, out.shape[-1], out).to(out.dtype)

        return hook

    def _norm(self):
        def hook(module, args, out):
            x = _local(args[0])  # a sequence-parallel norm sees a DTensor sharded on the sequence
            y = masked_norm(module, x, self._vector(self.plan.old_hidden, x.shape[-1], x))
            return DTensor.from_local(y, out.device_mesh, out.placements) if isinstance(out, DTensor) else y

        return hook

    def _scale_branch(self):
        def hook(module, args, out):
            return out * self.m

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def mask_value(step: int, start: int, ramp_steps: int) -> float:
    """Linear ramp: 0 at the growth step, 1 after `ramp_steps` steps."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, (step - start) / ramp_steps))


def rescale_head_for_width(grown: FLMTransformer, old: ModelConfig, new: ModelConfig) -> None:
    """Keep logits equal when the logit scale (μP's output_mult / width_mult) changes with width."""
    if old.logit_scale != new.logit_scale and grown.output is not None:
        with torch.no_grad():
            grown.output.weight.mul_(old.logit_scale / new.logit_scale)


def grow(
    model: FLMTransformer,
    new_config: ModelConfig,
    mode: DepthMode = "stack",
    init: DepthInit = "copy",
    order: Optional[list[LayerSource]] = None,
    seed: int = 0,
    initialize=None,
):
    """One growth event: (grown model, parameter origins, layer sources, mask plan). Masks not yet installed."""
    old = model.config
    check_growth(old, new_config)
    sources = layer_order(old.n_layers, new_config.n_layers, mode, init, order)
    grown, origin = grow_model(model, new_config, sources, seed, initialize)
    rescale_head_for_width(grown, old, new_config)
    return grown, origin, sources, MaskPlan.between(old, new_config, sources)
