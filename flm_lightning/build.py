"""Building a rank's network, the one path for every layout: construct, parallelise, initialise.

1. Construct the plain `FLMTransformer` (on the meta device under `FLMParallelStrategy(meta_init=True)`).
2. Install it: split, shard and compile it under the strategy (`FLMParallelStrategy.parallelize`), or
   apply activation checkpointing and compile in one process; the result is the rank's `StepEngine`.
3. Initialise every parameter by its role from its own generator, seeded by the run's seed and the
   parameter's name (`initialize_parameters`); the std of each role comes from μP (`MuP.init_std`) or
   the model's defaults (`FLMTransformer.init_std`). One process and every sharded layout therefore
   start from the same weights by construction, and no rank ever holds more than one full parameter.
4. Load `model.init_from` weights when given.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from flm_lightning.checkpoint import load_initial_weights
from flm_lightning.engine import StepEngine
from flm_lightning.model import FLMTransformer, ModelConfig
from flm_lightning.optim import OptimConfig, build_adamw

if TYPE_CHECKING:
    from flm_lightning.mup import MuP

InitStd = Callable[[str], Optional[float]]


def name_seed(seed: int, name: str) -> int:
    """A generator seed for one parameter: the same on every rank and layout, distinct per name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def initialize_parameters(model: nn.Module, init_std: InitStd, seed: int) -> None:
    """Initialise every parameter of `model` (plain, split or sharded) one full parameter at a time.

    Each parameter is drawn in full on the CPU from its own generator (`name_seed(seed, name)`), and a
    sharded parameter takes its shard of it, so the weights are the same whatever the layout.
    `init_std(name)` is the truncated-normal (±3σ) std of a matrix, or None for vector-like parameters
    (norm weights one, biases zero).
    """
    for name, param in model.named_parameters():
        full = torch.empty(param.shape, dtype=param.dtype, device="cpu")  # not the meta init context
        std = init_std(name)
        if std is None:
            full.fill_(0.0 if name.endswith("bias") else 1.0)
        else:
            generator = torch.Generator().manual_seed(name_seed(seed, name))
            nn.init.trunc_normal_(full, 0.0, std, -3 * std, 3 * std, generator=generator)
        if isinstance(param, DTensor):
            set_model_state_dict(model, {name: full}, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            param.copy_(full)


def install(
    model: FLMTransformer,
    strategy: Any = None,
    compute: Optional[Callable[[nn.Module], None]] = None,
    micro_batches: int = 1,
) -> StepEngine:
    """The step of `model` on this rank: under a strategy with `parallelize` (FLMParallelStrategy) the model is
    split, sharded and `compute` applied in place by it; else `compute` (activation checkpointing, compile)
    is applied here and the step runs `micro_batches` micro-batches in one process."""
    parallelize = getattr(strategy, "parallelize", None)
    if parallelize is not None:
        return parallelize(model, compute)
    if compute is not None:
        compute(model)
    return StepEngine(model, micro_batches=micro_batches)


def build(
    arch: ModelConfig,
    mup: Optional["MuP"],
    seed: int,
    *,
    strategy: Any = None,
    compute: Optional[Callable[[nn.Module], None]] = None,
    micro_batches: int = 1,
    load: Optional[str] = None,
) -> StepEngine:
    """Construct, install and initialise the network at `arch` (see the module docstring), μP's std per role
    when `mup` is given, else the model's; `seed` is the run's seed. Returns its step
    (`engine.model` is this rank's network). Call it inside the strategy's `tensor_init_context`.

    Raises:
        ConfigError: `load` holds weights of another architecture.
    """
    model = FLMTransformer(arch)
    engine = install(model, strategy, compute, micro_batches)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=strategy.root_device)
        model.rotary.reset_tables()
    initialize_parameters(model, mup.init_std if mup is not None else model.init_std, seed)
    if load:
        load_initial_weights(model, arch, load, sharded=engine.mesh is not None)
    return engine


def make_optimizer(
    model: torch.nn.Module, optim: OptimConfig, mup: Optional[MuP] = None, allow_fused: bool = True
) -> torch.optim.AdamW:
    """The run's AdamW for `model`: one group per μP role (its LR) when `mup` is given, else decay on matrices."""
    groups = mup.param_groups(model, optim.weight_decay) if mup is not None else None
    return build_adamw(model, optim, groups, allow_fused=allow_fused)
