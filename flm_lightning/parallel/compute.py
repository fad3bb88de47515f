"""Activation checkpointing and `torch.compile`, applied to a built model from outside.

torchtitan's order inside `configure_model`: tensor parallelism -> activation checkpointing ->
compile -> FSDP. Both functions work per transformer block of `model.layers` and keep every
parameter and state-dict name unchanged (TP plans, μP roles, growth and checkpoints address
parameters by name): checkpointing swaps the block's class for a subclass whose `forward`
recomputes (the way FSDP2's `fully_shard` swaps classes), and compile uses the in-place
`nn.Module.compile`, so no wrapper module adds a prefix.

Modes:
- "none": keep every activation.
- "full": keep only each block's input; the whole block runs again during backward
  (about one extra forward, i.e. ~1/3 more compute).
- "selective": operator-level selective checkpointing (torchtitan's "op" policy): keep the
  outputs of the matmuls and of the attention kernel, recompute the cheap ops between them
  (norms, rotary, activations, residual adds), so the extra compute is small.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal, Optional, get_args

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from flm_lightning.errors import ConfigError

log = logging.getLogger(__name__)

CheckpointMode = Literal["none", "full", "selective"]
CHECKPOINT_MODES = get_args(CheckpointMode)
# torch.compile backend of `model.compile: true`. "inductor" unless this environment variable names
# another (e.g. "aot_eager" to bisect a compile problem, or for a fast CPU smoke run without a C++ build).
COMPILE_BACKEND_VARIABLE = "FLM_COMPILE_BACKEND"


@functools.lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention kernels."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "linear",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    flash = getattr(torch.ops, "flash_attn", None)  # flash-attn >= 2.6 registers a custom op
    if flash is not None and hasattr(flash, "_flash_attn_forward"):
        ops.add(flash._flash_attn_forward.default)
    return frozenset(ops)


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


class _Checkpointed:
    """Mixin put in front of a block's class: its forward recomputes during backward."""

    checkpoint_mode = "full"

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # validation and generation: nothing to save
            return super().forward(*args, **kwargs)
        if self.checkpoint_mode == "selective":
            return checkpoint(super().forward, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


@functools.lru_cache(maxsize=None)
def _checkpointed_class(cls: type, mode: str) -> type:
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"checkpoint_mode": mode})


def check_checkpoint_mode(mode: str) -> None:
    if mode not in CHECKPOINT_MODES:
        raise ConfigError(f"model.activation_checkpointing must be one of {list(CHECKPOINT_MODES)}, got {mode!r}")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint every block of `model.layers` ("full" or "selective"); "none" removes it."""
    check_checkpoint_mode(mode)
    for block in model.layers.values():
        base = type(block)
        while issubclass(base, _Checkpointed):  # re-applying replaces the mode
            base = base.__mro__[2]
        block.__class__ = base if mode == "none" else _checkpointed_class(base, mode)
    if mode != "none":
        log.info("activation checkpointing: %s on %d blocks", mode, len(model.layers))


def apply_compile(model: nn.Module, backend: Optional[str] = None) -> None:
    """`torch.compile` each block in place (names unchanged); blocks share one compiled graph.

    backend: default $FLM_COMPILE_BACKEND, else "inductor".
    """
    backend = backend or os.environ.get(COMPILE_BACKEND_VARIABLE) or "inductor"
    for block in model.layers.values():
        block.compile(backend=backend, fullgraph=False)
    log.info("torch.compile (%s) on %d blocks", backend, len(model.layers))
