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
from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from flm_lightning.errors import ConfigError
from flm_lightning.growth import check_growth, layer_order
from flm_lightning.model import ModelConfig, count_model
from flm_lightning.optim import LR_POLICIES


@dataclass
class GrowthStage:
    """One growth event.

    Args:
        arch: the fields of model.arch that change (n_layers, n_heads, hidden_size, ffn_hidden_size,
            and base_hidden_size / head_dim where relevant).
        at_step: optimizer step at which to grow.
        at_tokens: or the number of training tokens after which to grow.
        ramp_steps: steps over which the masks rise from 0 to 1 before being folded away.
        depth_mode: where new layers go: "stack" (on top) or "interleave" (after their source).
        depth_init: new layers are "random" (fresh, at the init of the grown model: the default) or "copy"
            of existing ones. A copied layer applies its trained source's branch a second time once its
            mask reaches 1, so the function drifts over the ramp and the validation loss rises
            (measured in docs/growth.md); a fresh layer's residual outputs start at init_std / sqrt(2L).
        layer_order: an explicit order instead, e.g. [0, 1, "copy:1", 2, 3, "random"].
        lr_policy: "continue", "rewarmup" (FLM-101B: same schedule, short re-warmup) or "peak" (MSG).
        rewarmup_steps: length of the re-warmup.
        optimizer_step: AdamW step count of new tensors: "keep" or "reset_new".
        seed: seeds the initialisation of the new slices.
    """

    arch: dict[str, Any]
    at_step: Optional[int] = None
    at_tokens: Optional[float] = None
    ramp_steps: int = 100
    depth_mode: str = "stack"
    depth_init: str = "random"
    layer_order: Optional[list[Union[int, str]]] = None
    lr_policy: str = "rewarmup"
    rewarmup_steps: int = 100
    optimizer_step: str = "keep"
    seed: int = 0


class GrowthCallback(Callback):
    def __init__(self, stages: Optional[list[GrowthStage]] = None):
        super().__init__()
        self.stages = [s if isinstance(s, GrowthStage) else GrowthStage(**s) for s in stages or []]
        self.applied = 0
        self._steps: list[int] = []
        self._targets: list[ModelConfig] = []

    # ---- validation, before training ---------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
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
                raise ConfigError(f"{where} at step {step} starts during the ramp of the previous stage (ends at step {previous_end})")
            if s.lr_policy not in LR_POLICIES:
                raise ConfigError(f"{where}: lr_policy must be one of {list(LR_POLICIES)}, got {s.lr_policy!r}")
            if s.ramp_steps < 0 or s.rewarmup_steps < 0:
                raise ConfigError(f"{where}: ramp_steps and rewarmup_steps must be >= 0")
            try:
                target = ModelConfig.from_dict({**current.to_dict(), **s.arch})
                check_growth(current, target)
                layer_order(current.n_layers, target.n_layers, s.depth_mode, s.depth_init, s.layer_order)
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
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.applied >= len(self.stages) or trainer.global_step < self._steps[self.applied]:
            return
        s, target = self.stages[self.applied], self._targets[self.applied]
        pl_module.advance_growth_ramp(trainer.global_step)  # the function this step would train
        before = pl_module.eval_loss(batch)
        pl_module.apply_growth(
            target, mode=s.depth_mode, init=s.depth_init, order=s.layer_order, ramp_steps=s.ramp_steps,
            lr_policy=s.lr_policy, rewarmup_steps=s.rewarmup_steps, optimizer_step=s.optimizer_step, seed=s.seed,
        )
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
