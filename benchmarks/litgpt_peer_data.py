"""LitGPT's side of `benchmarks/litgpt_peer.py`: a LitGPT `DataModule` over prepared token windows.

Imported only inside the LitGPT virtual environment (`litgpt pretrain --data
benchmarks.litgpt_peer_data.PreparedWindows`, with the repository root on PYTHONPATH); it needs
numpy, torch and litgpt, never flm_lightning. `litgpt_peer.py` writes the windows: the batches this
project's trainer reads from the prepared python-docs corpus, in the trainer's order, one row of
`seq_len + 1` tokens per sample (LitGPT takes inputs `row[:-1]` and targets `row[1:]`, as the trainer).

The clock: the training stream records `time.perf_counter()` and `time.process_time()` when the
training loop asks for each batch (the DataLoader runs in the training process, `num_workers=0`),
i.e. at the start of every iteration, plus a checksum of the batch's input tokens. At exit the
record is written to `clock` as JSON; `litgpt_peer.py` reads it exactly as the trainer's
(`benchmarks/litgpt_peer_clock.py`).
"""

from __future__ import annotations

import atexit
import json
import os
import time
from typing import Iterator, Optional

import numpy as np
import torch
from litgpt.data import DataModule
from torch.utils.data import DataLoader, IterableDataset


class _Clock:
    """One per file, shared by every copy of the stream (Fabric may rebuild a DataLoader and its dataset)."""

    def __init__(self, path: str):
        self.path = path
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.checksums: list[int] = []
        atexit.register(self.write)

    def tick(self, batch: np.ndarray) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.checksums.append(int(batch[:, :-1].sum()))

    def write(self) -> None:
        record = {
            "side": "litgpt",
            "wall": self.wall,
            "cpu": self.cpu,
            "checksums": self.checksums,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "compile_disabled": os.environ.get("TORCH_COMPILE_DISABLE") == "1",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump(record, f)


_CLOCKS: dict[str, _Clock] = {}


def clock_at(path: str) -> _Clock:
    if path not in _CLOCKS:
        _CLOCKS[path] = _Clock(path)
    return _CLOCKS[path]


class _Stream(IterableDataset):
    """Batches of consecutive rows, in file order, cycling; the clock at `clock` ticks before each batch."""

    def __init__(self, windows: np.ndarray, batch_size: int, clock: str, limit: Optional[int]):
        self.windows, self.batch_size, self.clock, self.limit = windows, batch_size, clock, limit

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = len(self.windows) // self.batch_size
        clock = clock_at(self.clock) if self.clock else None
        i = 0
        while self.limit is None or i < self.limit:
            j = i % batches
            rows = np.asarray(self.windows[j * self.batch_size : (j + 1) * self.batch_size], dtype=np.int64)
            if clock is not None:
                clock.tick(rows)
            yield torch.from_numpy(rows)
            i += 1


class PreparedWindows(DataModule):
    """Token windows from a .npy file of shape [samples, seq_len + 1], read in order.

    Args:
        windows: the .npy file `litgpt_peer.py` wrote.
        clock: where to write the per-iteration clock (JSON); empty: no clock.
        val_batches: batches of the validation loader (LitGPT's sanity check before training).
    """

    def __init__(self, windows: str, clock: str = "", val_batches: int = 2):
        super().__init__()
        self.windows_path, self.clock_path, self.val_batches = windows, clock, val_batches
        self.batch_size = 1
        self.max_seq_length: Optional[int] = None
        self.windows: Optional[np.ndarray] = None

    def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: Optional[int] = None, **kwargs) -> None:
        self.batch_size, self.max_seq_length = batch_size, max_seq_length

    def setup(self, stage: str = "") -> None:
        self.windows = np.load(self.windows_path, mmap_mode="r")
        if self.max_seq_length is not None and self.windows.shape[1] != self.max_seq_length + 1:
            raise ValueError(
                f"{self.windows_path}: rows of {self.windows.shape[1]} tokens, the model needs "
                f"max_seq_length + 1 = {self.max_seq_length + 1}"
            )
        if len(self.windows) < self.batch_size:
            raise ValueError(
                f"{self.windows_path}: {len(self.windows)} rows, fewer than one batch of {self.batch_size}"
            )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.windows, self.batch_size, self.clock_path, None), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Stream(self.windows, self.batch_size, "", self.val_batches), batch_size=None, num_workers=0)

    def __repr__(self) -> str:
        return f"PreparedWindows({self.windows_path!r})"
