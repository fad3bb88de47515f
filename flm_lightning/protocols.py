"""What the callbacks read from the LightningModule they run with, as a `typing.Protocol`.

The callbacks (`flm_lightning.callbacks`) type their `pl_module` with `TrainedModule` instead of
`FLMLightningModule`: they depend on these few members, not on the module's class, and the module
never imports a callback. `FLMLightningModule` satisfies it (tests/test_guard.py checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from flm_lightning.growth.state import GrowthSpec, GrowthState
    from flm_lightning.model import ModelConfig


@runtime_checkable
class TrainedModule(Protocol):
    """The module members callbacks read: TrainingGuard (`last_loss`, `grad_norm`), GrowthCallback (`arch`,
    `growth`, `eval_loss`, `apply_growth`), TokenThroughputMonitor (`flops_per_batch`), and the Lightning
    members they use (`parameters`, `log`, `device`)."""

    arch: ModelConfig
    """The current (possibly grown) architecture."""
    last_loss: Optional[torch.Tensor]
    """The last training step's loss (None before the first step)."""
    flops_per_batch: Optional[int]
    """Model FLOPs of one optimizer step's batch on this rank (None before the first step)."""
    growth: GrowthState
    """The run's growth state (LR events, the mask ramp in progress, the history)."""

    @property
    def device(self) -> torch.device: ...

    def grad_norm(self) -> Optional[torch.Tensor]:
        """L2 norm of this step's gradients over every shard and stage; None without any gradient."""

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """This rank's per-token loss of `batch` with dropout off."""

    def apply_growth(self, target: ModelConfig, spec: Optional[GrowthSpec] = None, **options: Any) -> Any:
        """Grow the network to `target` now."""

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None: ...
