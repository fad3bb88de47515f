"""TrainingGuard: skip non-finite updates, catch loss and gradient-norm spikes, flag a rising norm.

    callbacks:
      - class_path: flm_lightning.callbacks.TrainingGuard
        init_args: {max_consecutive_nonfinite: 5, spike_policy: skip, spike_zscore: 6.0}

- A non-finite loss or gradient norm drops every gradient before the optimizer step (AdamW
  skips parameters without a gradient: no moment, step count or weight-decay change), and is
  counted (`guard/nonfinite_total`). After `max_consecutive_nonfinite` in a row the run saves
  `guard_stop.ckpt` (the weights are still the last good ones) and stops with an error.
- Spikes: loss and gradient norm are compared with an exponential running mean and deviation
  (after `warmup_steps`); a value beyond `spike_zscore` deviations (and `spike_min_ratio` times
  the mean) is a spike. Policy: `log`; `skip` (the update is dropped as above); `rollback`
  (weights and optimizer state are restored from the newest checkpoint, the data stream moves
  on, so the offending batches are skipped).
- A gradient norm whose mean over the last `trend_window` steps is `trend_ratio` times the mean
  of the window before is flagged once (`guard/grad_norm_rising`): the Tele-FLM warning sign.
- `inject_nonfinite_at` / `inject_spike_at` (steps) are test hooks.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from flm_lightning.errors import TrainingHalted
from flm_lightning.protocols import TrainedModule

POLICIES = ("log", "skip", "rollback")


class _RunningStat:
    def __init__(self, decay: float):
        self.decay, self.mean, self.var, self.count = decay, 0.0, 0.0, 0

    def is_spike(self, value: float, zscore: float, min_ratio: float, warmup: int) -> bool:
        if self.count < warmup:
            return False
        std = math.sqrt(max(self.var, 1e-12))
        return value > self.mean + zscore * std and value > min_ratio * self.mean

    def update(self, value: float) -> None:
        if self.count == 0:
            self.mean = value
        delta = value - self.mean
        self.mean += (1 - self.decay) * delta
        self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        self.count += 1


class TrainingGuard(Callback):
    def __init__(
        self,
        max_consecutive_nonfinite: int = 5,
        spike_policy: str = "log",
        spike_zscore: float = 6.0,
        spike_min_ratio: float = 1.5,
        warmup_steps: int = 50,
        ema_decay: float = 0.98,
        trend_window: int = 200,
        trend_ratio: float = 2.0,
        inject_nonfinite_at: Optional[list[int]] = None,
        inject_spike_at: Optional[list[int]] = None,
    ):
        super().__init__()
        if spike_policy not in POLICIES:
            raise ValueError(f"TrainingGuard.spike_policy must be one of {list(POLICIES)}, got {spike_policy!r}")
        self.max_consecutive = max_consecutive_nonfinite
        self.policy, self.zscore, self.min_ratio, self.warmup = (
            spike_policy,
            spike_zscore,
            spike_min_ratio,
            warmup_steps,
        )
        self.loss_stat, self.norm_stat = _RunningStat(ema_decay), _RunningStat(ema_decay)
        self.norms: deque[float] = deque(maxlen=2 * trend_window)
        self.trend_window, self.trend_ratio = trend_window, trend_ratio
        self.inject_nonfinite = set(inject_nonfinite_at or [])
        self.inject_spike = set(inject_spike_at or [])
        self.consecutive = self.nonfinite_total = self.spikes_total = self.rollbacks = 0
        self.rising_flagged = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: TrainedModule, optimizer) -> None:
        step = trainer.global_step
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        if step in self.inject_nonfinite:
            grads[0].fill_(float("nan"))
        if step in self.inject_spike:
            for g in grads:
                g.mul_(1e4)
        norm = float(pl_module.grad_norm())  # over every shard and stage under the parallel strategy
        loss = float(pl_module.last_loss)
        if not (math.isfinite(norm) and math.isfinite(loss)):
            self._drop_update(pl_module)
            self.consecutive += 1
            self.nonfinite_total += 1
            pl_module.log("guard/nonfinite_total", float(self.nonfinite_total))
            rank_zero_warn(f"step {step}: non-finite loss {loss} / gradient norm {norm}: update skipped")
            if self.consecutive >= self.max_consecutive:
                self._halt(trainer, f"{self.consecutive} consecutive non-finite steps (up to step {step})")
            return
        self.consecutive = 0
        spike = self.loss_stat.is_spike(loss, self.zscore, self.min_ratio, self.warmup) or self.norm_stat.is_spike(
            norm, self.zscore, self.min_ratio, self.warmup
        )
        if spike:
            self.spikes_total += 1
            pl_module.log("guard/spikes_total", float(self.spikes_total))
            rank_zero_warn(
                f"step {step}: spike (loss {loss:.4g}, gradient norm {norm:.4g}; "
                f"running means {self.loss_stat.mean:.4g}, {self.norm_stat.mean:.4g}): policy {self.policy}"
            )
            if self.policy == "skip":
                self._drop_update(pl_module)
                return
            if self.policy == "rollback":
                self._drop_update(pl_module)
                self._rollback(trainer, pl_module)
                return
        self.loss_stat.update(loss)
        self.norm_stat.update(norm)
        self._watch_trend(pl_module, norm)

    @staticmethod
    def _drop_update(pl_module: TrainedModule) -> None:
        for p in pl_module.parameters():
            p.grad = None

    def _rollback(self, trainer: L.Trainer, pl_module: TrainedModule) -> None:
        ckpt_cb = trainer.checkpoint_callback
        folder = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else None
        candidates = (
            sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder and folder.is_dir() else []
        )
        candidates = [p for p in candidates if p.name not in ("guard_stop.ckpt",)]
        if not candidates:
            rank_zero_warn("rollback requested but no checkpoint exists yet: the update is skipped instead")
            return
        ckpt = trainer.strategy.load_checkpoint(candidates[-1])
        if "state_dict" in ckpt:  # a single file: the strategy returns it to be loaded here
            trainer.strategy.load_model_state_dict(ckpt)
            trainer.strategy.load_optimizer_state_dict(ckpt)
        # else FLMParallelStrategy has loaded the sharded weights and optimizer state in place
        self.rollbacks += 1
        pl_module.log("guard/rollbacks", float(self.rollbacks))
        rank_zero_warn(
            f"rolled back to {candidates[-1].name} (step {ckpt.get('global_step')}); the data stream moves on"
        )

    def _watch_trend(self, pl_module: TrainedModule, norm: float) -> None:
        self.norms.append(norm)
        if self.rising_flagged or len(self.norms) < self.norms.maxlen:
            return
        values = list(self.norms)
        before = sum(values[: self.trend_window]) / self.trend_window
        recent = sum(values[self.trend_window :]) / self.trend_window
        if recent > self.trend_ratio * before:
            self.rising_flagged = True
            pl_module.log("guard/grad_norm_rising", 1.0)
            rank_zero_warn(
                f"the gradient norm is rising steadily ({before:.3g} -> {recent:.3g} over "
                f"{2 * self.trend_window} steps): a sign of coming divergence"
            )

    def _halt(self, trainer: L.Trainer, reason: str) -> None:
        folder = (
            Path(trainer.checkpoint_callback.dirpath)
            if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath
            else Path(trainer.default_root_dir)
        )
        path = folder / "guard_stop.ckpt"
        trainer.save_checkpoint(path)
        raise TrainingHalted(f"training stopped: {reason}; the last good state is in {path}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "nonfinite_total": self.nonfinite_total,
            "spikes_total": self.spikes_total,
            "rollbacks": self.rollbacks,
            "loss_stat": vars(self.loss_stat).copy(),
            "norm_stat": vars(self.norm_stat).copy(),
            "rising_flagged": self.rising_flagged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.spikes_total = state.get("spikes_total", 0)
        self.rollbacks = state.get("rollbacks", 0)
        self.rising_flagged = state.get("rising_flagged", False)
        for name in ("loss_stat", "norm_stat"):
            if name in state:
                vars(getattr(self, name)).update(state[name])
