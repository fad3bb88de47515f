"""Growth under FLMParallelStrategy: gather, grow on one device, re-shard.

The growth operators and the AdamW state transfer work on plain modules; under the strategy
every rank gathers the full model and optimizer state (all pipeline stages), grows that copy
exactly as a one-process run would, and the strategy then splits and shards the grown model
again and hands each rank its part of the carried-over optimizer state. Memory: one full copy
of model and AdamW state per rank for the moment of growing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from flm_lightning.engine import StepEngine
from flm_lightning.model import FLMTransformer, ModelConfig

FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)  # full tensors on every rank
FULL_FLAT = StateDictOptions(full_state_dict=True, cpu_offload=False, flatten_optimizer_state_dict=True)
PLAIN_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # for a plain (unsharded) model


def _merge_stages(runtime: StepEngine, part: dict) -> dict:
    """Union over the pipeline ranks of their stages' (full) entries."""
    if runtime.dims.pp == 1:
        return part
    parts: list = [None] * runtime.dims.pp
    dist.all_gather_object(parts, part, group=runtime.mesh["pp"].get_group())
    return {k: v for p in parts for k, v in p.items()}


def gather_for_growth(
    runtime: StepEngine,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    arch: ModelConfig,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
):
    """(full plain model, its AdamW with the full state) on every rank, from a sharded, split model."""
    weights = _merge_stages(runtime, get_model_state_dict(model, options=FULL))
    state = _merge_stages(runtime, get_optimizer_state_dict(model, optimizer, options=FULL_FLAT))
    device = next(iter(weights.values())).device
    with torch.device(device):
        plain = FLMTransformer(arch)
    plain.load_state_dict(weights)
    plain_optimizer = build_optimizer(plain)
    set_optimizer_state_dict(plain, plain_optimizer, state, options=PLAIN_FLAT)
    return plain, plain_optimizer


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The flattened (name-keyed) state of a plain model's optimizer."""
    return get_optimizer_state_dict(model, optimizer, options=PLAIN_FLAT)


def _fqn(flat_key: str) -> str:
    """'state.layers.0.attention.wq.weight.exp_avg' -> 'layers.0.attention.wq.weight'."""
    return flat_key.split(".", 1)[1].rsplit(".", 1)[0]


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Give a sharded (and possibly pipeline-pruned) optimizer its part of a full flattened state.

    Each rank cuts its own shard out of the full moments (no communication). Only the moments
    are taken; the group settings (LR, initial_lr of the new schedule) stay those of the freshly
    configured optimizer.
    """
    params = dict(model.named_parameters())
    groups = {
        k: v
        for k, v in get_optimizer_state_dict(model, optimizer, options=PLAIN_FLAT).items()
        if k.startswith("param_groups.")
    }
    moments = {}
    for key, value in state.items():
        param = params.get(_fqn(key)) if key.startswith("state.") else None
        if param is None:
            continue
        if isinstance(param, DTensor) and torch.is_tensor(value) and value.dim() > 0:
            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        moments[key] = value
    set_optimizer_state_dict(model, optimizer, {**groups, **moments}, options=PLAIN_FLAT)
