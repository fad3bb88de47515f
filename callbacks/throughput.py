"""Training throughput: tokens/s, achieved TFLOP/s and MFU, in TensorBoard and the progress bar."""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback


class TokenThroughputMonitor(Callback):
    """Logs `throughput/tokens_per_sec` (per process), `throughput/tflops` and, with a peak, `throughput/mfu`.

    Averages over a sliding window of batches with Lightning's `Throughput` meter; time spent in
    validation is excluded. FLOPs per batch come from the module's `flops_per_batch` (6N plus
    attention, see `flm_lightning.model.counting`).

    Args:
        window_size: batches averaged over.
        peak_tflops: the device's peak TFLOP/s per process (e.g. 989 for an H100 SXM in bf16);
            without it no MFU is logged.
    """

    def __init__(self, window_size: int = 20, peak_tflops: Optional[float] = None):
        super().__init__()
        if window_size < 2:
            raise ValueError(f"TokenThroughputMonitor.window_size must be >= 2, got {window_size}")
        self.window_size = window_size
        self.peak_tflops = peak_tflops
        self._meter: Optional[Throughput] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = self.peak_tflops * 1e12 if self.peak_tflops else None
        self._meter = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window_size)
        self._start = time.perf_counter()
        self._paused = 0.0
        self._batches = self._samples = self._tokens = self._flops = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._meter is not None:
            self._paused += time.perf_counter() - self._val_start

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        ids = batch["input_ids"]
        self._batches += 1
        self._samples += ids.shape[0]
        self._tokens += ids.numel()
        flops = getattr(pl_module, "flops_per_batch", None)
        self._meter.update(
            time=time.perf_counter() - self._start - self._paused,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=flops,
        )
        metrics = self._meter.compute()
        if "device/items_per_sec" in metrics:
            pl_module.log("throughput/tokens_per_sec", float(metrics["device/items_per_sec"]), prog_bar=True)
        if "device/flops_per_sec" in metrics:
            pl_module.log("throughput/tflops", float(metrics["device/flops_per_sec"]) / 1e12)
        if "device/mfu" in metrics:
            pl_module.log("throughput/mfu", float(metrics["device/mfu"]))
