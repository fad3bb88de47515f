"""Save a checkpoint and stop cleanly on SIGTERM / SIGUSR1 (preemption, SLURM's warning signal)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class PreemptionCheckpoint(Callback):
    """On one of `signals`, finish the current step, save `DIR/preempted.ckpt` (and `last.ckpt`
    when a ModelCheckpoint saves one), and end `fit` with exit status 0, ready to be requeued
    and resumed with `--ckpt_path last`.

    Args:
        signals: signal names to catch.
        dirpath: where to save; default the ModelCheckpoint's folder.
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
        folder = Path(self.dirpath or (trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir))
        trainer.save_checkpoint(folder / "preempted.ckpt")
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.save_last:
            trainer.save_checkpoint(folder / "last.ckpt")
        rank_zero_info(f"{self.received} received: saved {folder / 'preempted.ckpt'} at step {trainer.global_step}; stopping")
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
