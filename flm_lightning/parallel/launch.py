"""Run a function in N local processes as if under torchrun (env:// rendezvous), by forking.

Forked children reuse the parent's imported torch and Lightning (about 0.2 s a rank instead of
3-4 s), which keeps multi-process CPU tests and the layout comparison fast. Lightning sees the
torchrun variables and neither relaunches nor re-executes the command line. The parent must not
have created a process group. On a cluster, launch `main.py` with torchrun or SLURM instead.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, log_dir: Optional[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    if log_dir is not None:  # one log per rank: N processes writing one terminal is unreadable
        log = open(Path(log_dir) / f"rank{rank}.log", "w", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
    import torch

    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        traceback.print_exc()  # into this rank's log too; the parent re-raises the first failure
        raise


def run_forked(fn: Callable, nprocs: int, *args, log_dir: Optional[str] = None) -> None:
    """Call fn(*args) in `nprocs` forked ranks and wait; a failing rank raises in the parent."""
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _child, args=(nprocs, free_port(), fn, args, log_dir), nprocs=nprocs, start_method="fork", join=True
    )
