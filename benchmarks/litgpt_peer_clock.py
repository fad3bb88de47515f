"""The trainer's side of `benchmarks/litgpt_peer.py`: a Lightning callback that clocks every step.

`main.py fit` loads it from the generated run config (`trainer.callbacks`), with the repository
root as the working directory. At the start of every training batch it records
`time.perf_counter()`, `time.process_time()` and a checksum of the batch's input tokens; at the end
of training it writes them, the parameter count, the thread count and the first step's loss as JSON
to `out`. LitGPT's side records the same at the start of every iteration
(`benchmarks/litgpt_peer_data.py`), so both are timed from the start of step `warmup` to the start of
step `warmup + steps`, data loading and every per-step hook included.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback


class PeerStepClock(Callback):
    """Per-step wall and CPU clock for the peer benchmark.

    Args:
        out: where the JSON record goes.
    """

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.checksums: list[int] = []
        self.first_loss: Optional[float] = None
        self.parameters = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.parameters = sum(p.numel() for p in pl_module.parameters())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.checksums.append(int(batch["input_ids"].sum()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_loss is None:
            loss = getattr(pl_module, "last_loss", None)
            self.first_loss = None if loss is None else float(loss)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "side": "ours",
            "wall": self.wall,
            "cpu": self.cpu,
            "checksums": self.checksums,
            "first_loss": self.first_loss,
            "parameters": self.parameters,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "precision": str(trainer.precision),
            "compile_disabled": os.environ.get("TORCH_COMPILE_DISABLE") == "1",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
        with open(self.out, "w", encoding="utf-8") as f:
            json.dump(record, f)
