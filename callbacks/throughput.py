"""Training throughput: tokens/s, achieved TFLOP/s and MFU, in TensorBoard and the progress bar.

Model FLOPs per token (`flm_lightning.model.count_model`, one training step, forward + backward):
6 x (all Linear weights + the output head) + 12 x n_layers x (heads x head_dim) x seq_len, i.e.
6N plus the attention score and value matmuls without the causal halving (Megatron / PaLM MFU
convention). Recomputation (activation checkpointing) is not counted: MFU counts model FLOPs.
MFU = achieved FLOP/s / peak FLOP/s of the device.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from flm_lightning.loggers import logging_step  # noqa: F401  (re-exported: older imports)
from flm_lightning.protocols import TrainedModule

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name; first match wins.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM and NVL
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def device_peak_tflops(device: torch.device) -> Optional[float]:
    """The bf16 peak of a known CUDA GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


class TokenThroughputMonitor(Callback):
    """Logs `throughput/tokens_per_sec` (per data-parallel rank), `throughput/tflops` and `throughput/mfu`
    (per process).

    Averages over a sliding window of batches with Lightning's `Throughput` meter; time spent in
    validation is excluded. FLOPs per batch come from the module's `flops_per_batch` (6N plus
    attention, see `flm_lightning.model.counting`).

    Args:
        window_size: batches averaged over (measured on logging steps, every
            `trainer.log_every_n_steps`, so rounded up to a multiple of that).
        peak_tflops: the device's peak TFLOP/s per process (e.g. 989 for an H100 SXM in bf16);
            default: looked up in `PEAK_TFLOPS` by the CUDA device name; on other devices, or an
            unknown GPU, no MFU is logged.
    """

    def __init__(self, window_size: int = 20, peak_tflops: Optional[float] = None):
        super().__init__()
        if window_size < 2:
            raise ValueError(f"TokenThroughputMonitor.window_size must be >= 2, got {window_size}")
        self.window_size = window_size
        self.peak_tflops = peak_tflops
        self._meter: Optional[Throughput] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: TrainedModule) -> None:
        peak_tflops = self.peak_tflops or device_peak_tflops(pl_module.device)
        if peak_tflops and not self.peak_tflops:
            rank_zero_info(
                f"TokenThroughputMonitor: MFU against {peak_tflops:g} TFLOP/s "
                f"({torch.cuda.get_device_name(pl_module.device)})"
            )
        peak = peak_tflops * 1e12 if peak_tflops else None
        # Updated on logging steps only: enough points to span about `window_size` batches.
        points = max(2, math.ceil(self.window_size / max(trainer.log_every_n_steps, 1)) + 1)
        # Under tensor / pipeline parallelism a batch's FLOPs are split over tp x pp processes that
        # all see its tokens: FLOPs per process are divided by that, tokens are the dp shard's.
        dp = (getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get(
            "num_replicas", trainer.world_size
        )
        self._model_parallel = max(1, trainer.world_size // dp)
        self._meter = Throughput(available_flops=peak, world_size=dp, window_size=points)
        self._start = time.perf_counter()
        self._paused = 0.0
        self._batches = self._samples = self._tokens = self._flops = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: TrainedModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: TrainedModule) -> None:
        if self._meter is not None:
            self._paused += time.perf_counter() - self._val_start

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: TrainedModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ids = batch["input_ids"]
        self._batches += 1
        self._samples += ids.shape[0]
        self._tokens += ids.numel()
        self._flops += (pl_module.flops_per_batch or 0) / self._model_parallel
        if not logging_step(trainer, trainer.global_step):
            return
        # Lightning writes logged values on logging steps only: measure there, so a GPU run pays one
        # synchronisation per logging step instead of one per step.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._meter.update(
            time=time.perf_counter() - self._start - self._paused,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=self._flops or None,  # FLOPs since the last update
        )
        self._flops = 0
        metrics = self._meter.compute()
        if "device/items_per_sec" in metrics:
            pl_module.log("throughput/tokens_per_sec", float(metrics["device/items_per_sec"]), prog_bar=True)
        if "device/flops_per_sec" in metrics:
            pl_module.log("throughput/tflops", float(metrics["device/flops_per_sec"]) / 1e12)
        if "device/mfu" in metrics:
            pl_module.log("throughput/mfu", float(metrics["device/mfu"]))
