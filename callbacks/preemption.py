"""Save a checkpoint and stop cleanly on SIGTERM / SIGUSR1 (preemption, SLURM's warning signal)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class PreemptionCheckpoint(Callback):
    """On one of `signals`, finish the current optimizer step, save a checkpoint and end `fit` with exit
    status 0, ready to be requeued and resumed with `--ckpt_path last`.

    A training batch is a whole optimizer step (all its micro-batches), so the checkpoint always
    holds a step boundary. With a ModelCheckpoint that keeps `last`, the checkpoint is written as
    that callback's `last.ckpt` and recorded as its `last_model_path`, so the resumed run's
    ModelCheckpoint keeps overwriting the same `last.ckpt` (no `last-v1.ckpt` beside a stale one):
    `last.ckpt` is always the newest checkpoint. Without one, `preempted.ckpt` is written in
    `dirpath` (default: the trainer's root folder).

    Args:
        signals: signal names to catch.
        dirpath: where to save `preempted.ckpt` when no ModelCheckpoint keeps `last`.
    """

    def __init__(self, signals: Optional[list[str]] = None, dirpath: Optional[str] = None):
        super().__init__()
        self.signals = signals or ["SIGTERM", "SIGUSR1"]
        self.dirpath = dirpath
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.signals:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        self.received = signal.Signals(number).name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.received is None:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"{self.received} received: saved {path} at step {trainer.global_step}; stopping")
        trainer.should_stop = True

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """`last.ckpt` of the ModelCheckpoint that keeps one (now its `last_model_path`), else `preempted.ckpt`."""
        keeper = next(
            (
                cb
                for cb in trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath
            ),
            None,
        )
        if keeper is None:
            return Path(self.dirpath or trainer.default_root_dir) / "preempted.ckpt"
        candidates = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
        path = keeper.format_checkpoint_name(candidates, keeper.CHECKPOINT_NAME_LAST)
        keeper.last_model_path = path  # before saving: it is part of the callback's saved state
        return Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
