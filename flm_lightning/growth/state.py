"""Growth as a plain object: the one growth spec and the run's growth state (no Lightning).

`GrowthSpec` says how one growth event grows (depth placement, re-initialisation, mask ramp,
LR policy, AdamW step policy); `GrowthCallback` stages and `python -m flm_lightning grow` both
take it, so an option is added once, here. `GrowthState` holds what a run carries between
steps and across checkpoints: the LR events (read live by the LR schedule), the mask ramp in
progress with its masks, and the history of growth events.

The LightningModule only swaps in the grown network and rebuilds its optimizer; this module
never touches a trainer.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Literal, Optional, Protocol, Union

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from flm_lightning.errors import ConfigError
from flm_lightning.growth.operators import DepthInit, DepthMode, GrowthMasks, MaskPlan, grow, layer_order, mask_value
from flm_lightning.growth.optimizer import transfer_adam_state
from flm_lightning.model import FLMTransformer, ModelConfig
from flm_lightning.optim import LRPolicy


@dataclass
class GrowthSpec:
    """How one growth event grows the model (the target architecture is given separately)."""

    ramp_steps: int = 100
    """Optimizer steps over which the masks rise from 0 to 1 before they are folded away (0: at once)."""
    depth_mode: DepthMode = "stack"
    """Where new layers go: on top ("stack") or right after their source layer ("interleave")."""
    depth_init: DepthInit = "copy"
    """New layers are copies of existing ones ("copy") or freshly initialised ("random")."""
    layer_order: Optional[list[Union[int, str]]] = None
    """An explicit layer order instead of depth_mode / depth_init, e.g. [0, 1, "copy:1", 2, 3, "random"]."""
    lr_policy: LRPolicy = "rewarmup"
    """LR after growing: "continue", "rewarmup" (FLM-101B: same schedule, short re-warmup) or "peak" (MSG)."""
    rewarmup_steps: int = 100
    """Length of the re-warmup in optimizer steps."""
    optimizer_step: Literal["keep", "reset_new"] = "keep"
    """AdamW step count of new tensors: that of their source ("keep") or 0 ("reset_new")."""
    seed: int = 0
    """Seeds the initialisation of the new slices."""

    def check(self, current: Optional[ModelConfig] = None, target: Optional[ModelConfig] = None) -> None:
        """Raise ConfigError for a choice outside its Literal, a negative length, or (given both configs)
        a layer order that does not lead from `current` to `target`."""
        hints = typing.get_type_hints(GrowthSpec)
        for f in fields(GrowthSpec):
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if self.ramp_steps < 0 or self.rewarmup_steps < 0:
            raise ConfigError("ramp_steps and rewarmup_steps must be >= 0")
        if current is not None and target is not None:
            layer_order(current.n_layers, target.n_layers, self.depth_mode, self.depth_init, self.layer_order)

    def options(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


@dataclass
class GrownNetwork:
    """The result of one growth event on a full (unsharded) model."""

    model: FLMTransformer
    """The grown full model, masks not yet attached."""
    old_model: nn.Module
    """The full model before growing."""
    origin: dict[str, Optional[str]]
    """Each grown parameter's source parameter name (None: new)."""
    optimizer_state: Optional[dict] = None
    """The carried-over AdamW state of `model`, flattened and keyed by parameter name (when an optimizer was given)."""
    optimizer: Optional[torch.optim.Optimizer] = None
    """A plain AdamW over `model` holding that state (when an optimizer was given)."""


class GrowthState:
    """A run's growth state: LR events, the mask ramp in progress (with its masks) and the history.

    `lr_events` is one list for the object's lifetime (the LR schedule reads it live); loading a
    state replaces its contents.
    """

    def __init__(self) -> None:
        self.lr_events: list[dict] = []
        self.ramp: Optional[dict] = None  # {"plan": MaskPlan fields, "start_step", "ramp_steps"}
        self.mask_value: Optional[float] = None  # m of the ramp in progress, in [0, 1)
        self.history: list[dict] = []
        self.masks: Optional[GrowthMasks] = None  # hooks on the current model, when attached

    # ---- the ramp --------------------------------------------------------------------------
    def advance(self, step: int) -> None:
        """Set the mask value of the ramp in progress to its value at optimizer step `step`; fold the masks
        away once it reaches 1."""
        if self.ramp is None:
            return
        m = mask_value(step, self.ramp["start_step"], self.ramp["ramp_steps"])
        if m >= 1.0:
            self.fold()
        else:
            self.mask_value = m
            if self.masks is not None:
                self.masks.m = m

    def fold(self) -> None:
        """End the ramp: remove the masks (the grown network then computes its plain function)."""
        self.detach()
        self.ramp, self.mask_value = None, None

    def detach(self) -> None:
        """Remove the mask hooks from the model (the ramp, if any, stays pending)."""
        if self.masks is not None:
            self.masks.remove()
        self.masks = None

    def attach(self, model: FLMTransformer, tp_rank: int = 0) -> None:
        """Hook the masks of the ramp in progress (if any) onto `model`, this rank's (possibly split,
        sharded) network; `tp_rank` cuts tensor-parallel slices."""
        self.detach()
        if self.ramp is not None:
            self.masks = GrowthMasks(model, MaskPlan(**self.ramp["plan"]), m=self.mask_value or 0.0, tp_rank=tp_rank)

    def check_can_grow(self, step: int) -> None:
        """Raise ConfigError if a ramp is still in progress at `step` (one that ends exactly then is folded)."""
        self.advance(step)
        if self.ramp is not None:
            raise ConfigError(
                f"cannot grow at step {step}: the ramp of the growth at step {self.ramp['start_step']} "
                "is still in progress"
            )

    # ---- growing -------------------------------------------------------------------------------
    def grow(
        self,
        model: FLMTransformer,
        target: ModelConfig,
        spec: GrowthSpec,
        step: int,
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        build_optimizer: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None,
        initialize: Optional[Callable[[nn.Module], None]] = None,
    ) -> GrownNetwork:
        """Grow the full model `model` to `target` at optimizer step `step` (function preserving once masked).

        With `optimizer` (AdamW of `model`), `build_optimizer(grown)` receives its state moved into the
        grown shapes (`transfer_adam_state`). `initialize` (re)initialises the grown model's new slices
        (μP). Records the LR event, the ramp and the history; the masks are attached by `attach`.

        Raises:
            ConfigError: a ramp still in progress, a bad spec, or a target that is not a growth.
        """
        spec.check()  # the layer order is checked by `grow`, after the target
        self.check_can_grow(step)
        old_arch = model.config
        grown, origin, sources, plan = grow(
            model,
            target,
            mode=spec.depth_mode,
            init=spec.depth_init,
            order=spec.layer_order,
            seed=spec.seed,
            initialize=initialize,
        )
        self.ramp = {"plan": asdict(plan), "start_step": step, "ramp_steps": spec.ramp_steps}
        self.mask_value = 0.0
        self.lr_events.append({"step": step, "policy": spec.lr_policy, "rewarmup_steps": spec.rewarmup_steps})
        self.history.append(
            {
                "step": step,
                "from": old_arch.to_dict(),
                "to": target.to_dict(),
                "layer_sources": [str(x) for x in sources],
            }
        )
        if spec.ramp_steps <= 0:
            self.fold()
        result = GrownNetwork(grown, model, origin)
        if optimizer is not None:
            result.optimizer = build_optimizer(grown)
            transfer_adam_state(optimizer, model, result.optimizer, grown, origin, spec.optimizer_step)
            result.optimizer_state = get_optimizer_state_dict(
                grown, result.optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
            )
        return result

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain containers (checkpoints load with weights_only=True)."""
        return {
            "ramp": self.ramp,
            "mask_value": self.mask_value,
            "lr_events": list(self.lr_events),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved state (masks are re-attached by `attach` once the network has the saved shape)."""
        self.detach()
        self.lr_events[:] = state.get("lr_events", [])
        self.history = list(state.get("history", []))
        self.ramp = state.get("ramp")
        self.mask_value = state.get("mask_value") if self.ramp is not None else None


def checkpoint_arch(checkpoint: dict[str, Any], current: ModelConfig, where: str) -> Optional[ModelConfig]:
    """The architecture of a checkpoint's network when the run grew away from `current` (the config's), so
    the network must be rebuilt at it before the weights load; None when they compute the same function.

    Raises:
        ConfigError: the architectures differ and the checkpoint did not grow (`where` names it).
    """
    saved = ModelConfig.from_dict(checkpoint["hyper_parameters"]["arch"])
    if saved.function_fields() == current.function_fields():
        return None
    if not (checkpoint.get("flm_growth") or {}).get("history"):
        raise ConfigError(f"{where}: model.arch differs from the config's: {saved.differences(current)}")
    return saved


class GrowthHost(Protocol):
    """What `grow_host` needs from the module that trains the network (`FLMLightningModule`)."""

    model: FLMTransformer  # this rank's (possibly split, sharded) network
    arch: ModelConfig
    engine: Any  # its StepEngine
    growth: GrowthState
    mup_cfg: Any
    optim_cfg: Any
    global_step: int
    sharded: bool

    def trainer_or_none(self) -> Any: ...
    def build_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer: ...
    def swap_network(
        self, model: FLMTransformer, arch: ModelConfig, optimizer_state: Optional[dict] = None
    ) -> None: ...


def grow_host(host: GrowthHost, target: ModelConfig, spec: GrowthSpec) -> GrownNetwork:
    """Grow `host`'s network to `target` at its current step: inside `fit` with the AdamW state carried over
    and the optimizer rebuilt; under FLMParallelStrategy a gathered full copy grows exactly as one process
    would and is split and sharded again. Masks are attached to the new network.

    Raises:
        ConfigError: a ramp still in progress, a target that is not a growth of the current model or does not
            fit the parallel layout; nothing has changed then.
    """
    from flm_lightning.mup import MuP
    from flm_lightning.parallel.growth import gather_for_growth

    trainer = host.trainer_or_none()
    if host.sharded:
        trainer.strategy.check_growth_target(target)
    host.growth.check_can_grow(host.global_step)
    model, optimizer = host.model, trainer.optimizers[0] if trainer is not None and trainer.training else None
    if host.sharded:  # grow a gathered full copy, exactly as one process would
        model, optimizer = gather_for_growth(host.engine, host.model, optimizer, host.arch, host.build_optimizer)
    initialize = MuP(host.mup_cfg, target, host.optim_cfg.lr).initialize if host.mup_cfg is not None else None
    grown = host.growth.grow(
        model,
        target,
        spec,
        host.global_step,
        optimizer=optimizer,
        build_optimizer=host.build_optimizer,
        initialize=initialize,
    )
    host.swap_network(grown.model, target, grown.optimizer_state)
    host.growth.attach(host.model, host.engine.tp_rank)  # after sharding: hooks on this rank's modules
    return grown
