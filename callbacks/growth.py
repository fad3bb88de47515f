"""GrowthCallback: grow the model during one `fit`, on a schedule written in YAML.

    callbacks:
      - class_path: flm_lightning.callbacks.GrowthCallback
        init_args:
          stages:
            - at_step: 300                       # or at_tokens: 2.5e6
              arch: {hidden_size: 192, n_heads: 6, ffn_hidden_size: 512}
              ramp_steps: 50
            - at_step: 500
              arch: {n_layers: 6}
              depth_mode: interleave             # stack | interleave | layer_order: [0, "copy:0", ...]
              lr_policy: peak                    # continue | rewarmup (FLM-101B) | peak (MSG)

Every stage is checked against the model before training starts (no shrinking, heads that
divide, no stage starting inside the previous stage's ramp), so a bad schedule fails before
any state changes. Each event logs to TensorBoard: parameters, FLOPs per token, and the loss
of the current batch just before and just after growing (equal: growth preserves the function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from flm_lightning.errors import ConfigError
from flm_lightning.growth import check_growth
from flm_lightning.growth.operators import DepthInit
from flm_lightning.growth.state import GrowthSpec
from flm_lightning.model import ModelConfig, count_model
from flm_lightning.protocols import TrainedModule


@dataclass
class GrowthStage(GrowthSpec):
    """One growth event of the schedule: when, to what, and how (the `GrowthSpec` fields)."""

    arch: dict[str, Any] = field(default_factory=dict)
    """The fields of model.arch that change (n_layers, n_heads, hidden_size, ffn_hidden_size, and
    base_hidden_size / head_dim where relevant)."""
    at_step: Optional[int] = None
    """Optimizer step at which to grow."""
    at_tokens: Optional[float] = None
    """Or the number of training tokens after which to grow."""
    depth_init: DepthInit = "random"
    """New layers are "random" (fresh, at the init of the grown model: the default for a stage) or "copy" of
    existing ones. A copied layer applies its trained source's branch a second time once its mask reaches 1,
    so the function drifts over the ramp and the validation loss rises (measured in docs/growth.md); a fresh
    layer's residual outputs start at init_std / sqrt(2L). (The offline grow tool keeps GrowthSpec's "copy".)"""


class GrowthCallback(Callback):
    def __init__(self, stages: Optional[list[GrowthStage]] = None):
        super().__init__()
        self.stages = [s if isinstance(s, GrowthStage) else GrowthStage(**s) for s in stages or []]
        self.applied = 0
        self._steps: list[int] = []
        self._targets: list[ModelConfig] = []

    # ---- validation, before training ---------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: TrainedModule, stage: str) -> None:
        if stage != "fit":
            return
        tokens_per_step = self._tokens_per_step(trainer)
        current = pl_module.arch
        self._steps, self._targets = [], []
        previous_end = -1
        for i, s in enumerate(self.stages):
            where = f"GrowthCallback stage {i}"
            if (s.at_step is None) == (s.at_tokens is None):
                raise ConfigError(f"{where}: give exactly one of at_step and at_tokens")
            if s.at_tokens is not None and tokens_per_step is None:
                raise ConfigError(f"{where}: at_tokens needs a datamodule with batch_size and seq_len; use at_step")
            step = s.at_step if s.at_step is not None else math.ceil(s.at_tokens / tokens_per_step)
            if step < 1:
                raise ConfigError(f"{where}: growth must happen after at least one step, got step {step}")
            if step < previous_end:
                raise ConfigError(
                    f"{where} at step {step} starts during the ramp of the previous stage (ends at step {previous_end})"
                )
            try:
                s.check()
                target = ModelConfig.from_dict({**current.to_dict(), **s.arch})
                check_growth(current, target)
                s.check(current, target)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            check_target = getattr(trainer.strategy, "check_growth_target", None)  # FLMParallelStrategy
            if check_target is not None:
                try:
                    check_target(target)
                except ConfigError as e:
                    raise ConfigError(f"{where}: {e}") from None
            self._steps.append(step)
            self._targets.append(target)
            previous_end, current = step + s.ramp_steps, target

    @staticmethod
    def _tokens_per_step(trainer: L.Trainer) -> Optional[int]:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "global_batch") or not hasattr(dm, "seq_len"):
            return None
        return dm.global_batch() * dm.seq_len

    # ---- growing --------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: TrainedModule, batch: Any, batch_idx: int) -> None:
        if self.applied >= len(self.stages) or trainer.global_step < self._steps[self.applied]:
            return
        s, target = self.stages[self.applied], self._targets[self.applied]
        pl_module.growth.advance(trainer.global_step)  # the function this step would train
        before = pl_module.eval_loss(batch)
        pl_module.apply_growth(target, s)  # a stage is a GrowthSpec
        after = pl_module.eval_loss(batch)
        self.applied += 1
        size = count_model(target)
        metrics = {
            "growth/parameters": size.parameters,
            "growth/flops_per_token": size.flops_per_token,
            "growth/loss_before": before,
            "growth/loss_after": after,
            "growth/stage": self.applied,
        }
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"growth {self.applied} at step {trainer.global_step}: {size.parameters:,} parameters, "
            f"loss {before:.5f} -> {after:.5f}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = int(state_dict.get("applied", 0))
