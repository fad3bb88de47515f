"""`python -m flm_lightning bench -c CONFIG`: the trainer's throughput against a hand-written loop.

Each repeat runs the full Lightning trainer of the config (its callbacks, logger, gradient
clipping and precision; checkpointing and validation off) and a minimal PyTorch loop on the
identical model (same init through `configure_model`), the same batches (the config's
DataModule), the same precision (`torch.autocast` for bf16-mixed), the same AdamW, LR schedule
and clipping. Both are timed from the start of step `--warmup` to the start of step
`--warmup + --steps`, so data loading and every per-step hook count. Every run starts in its own
fresh interpreter (no allocator, thread or import state from the run before), and the side that
goes first alternates between repeats. The ratio trainer / loop is the framework's throughput share
(1.0 = no overhead); the median over `--repeats` is reported with min, max and IQR of each side
and of the ratio.
The same ratio in tokens per second of process CPU time is reported beside it: on a shared CPU
machine other processes inflate wall times at random, but not the CPU time each side spends.

Peak memory: CUDA `max_memory_allocated`; on a Linux CPU the process's peak resident memory
(VmHWM) above its resident memory at the start of the run, after returning freed heap to the
system (`malloc_trim`). On a GPU the model FLOP utilisation (MFU) uses `--peak-tflops` or the
known peak of the device (`flm_lightning.callbacks.throughput.PEAK_TFLOPS`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from flm_lightning.errors import ConfigError
from flm_lightning.model import count_model
from flm_lightning.tools.configs import add_config_arguments, shown

CHECKPOINT_CALLBACKS = ("ModelCheckpoint", "PreemptionCheckpoint")
PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, help="a LightningCLI YAML config (e.g. conf/tiny.yaml)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="trainer/loop pairs; each run in a fresh process, the first side alternating",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run everything in this process (the old way; state carries over between runs): for "
        "process-wide settings such as a forced sdpa kernel, or a short GPU session",
    )
    parser.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--json", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> None:
    for name in ("steps", "warmup", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise ConfigError(
                f"--{name} must be {'>= 0' if name == 'warmup' else 'a positive integer'}, got {getattr(args, name)}"
            )
    result = benchmark(
        args.config,
        args.steps,
        args.warmup,
        args.repeats,
        args.peak_tflops,
        args.set,
        progress=print,
        fresh_processes=not args.same_process,
    )
    print_report(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


def benchmark(
    configs: Sequence[str],
    steps: int,
    warmup: int,
    repeats: int,
    peak_tflops: Optional[float] = None,
    overrides: Sequence[str] = (),
    progress: Callable[[str], Any] = lambda _: None,
    fresh_processes: bool = True,
) -> dict:
    """Trainer / loop runs, the first side alternating; tokens/s of each, their ratios (median and spread) and
    peak memory. The config is `configs` overlaid and `overrides` (KEY=VALUE) applied, as main.py reads them.
    `fresh_processes`: each run in a new interpreter (default), else all in this one."""
    from flm_lightning.cli import load_config

    values = load_config(configs, overrides).values
    trainer_runs, loop_runs = [], []
    with tempfile.TemporaryDirectory(prefix="flm-bench-") as logs:
        call = _fresh if fresh_processes else (lambda fn, *args: fn(*args))
        call(_trainer_run, values, 1, 0, logs)  # prepares the data once (not timed)
        for repeat in range(repeats):
            # Each run in its own fresh process (no allocator, thread-pool or import state carried
            # over from the other side), and the side that goes first alternates.
            order = (("trainer", _trainer_run), ("loop", _loop_run))
            for side, fn in order if repeat % 2 == 0 else order[::-1]:
                (trainer_runs if side == "trainer" else loop_runs).append(call(fn, values, steps, warmup, logs))
            progress(
                f"repeat {repeat + 1}/{repeats} ({'trainer' if repeat % 2 == 0 else 'loop'} first): "
                f"trainer {trainer_runs[-1]['tokens_per_sec']:,.0f} tokens/s, "
                f"loop {loop_runs[-1]['tokens_per_sec']:,.0f} tokens/s"
            )
    first = trainer_runs[0]
    ratios = [t["tokens_per_sec"] / p["tokens_per_sec"] for t, p in zip(trainer_runs, loop_runs)]
    # Tokens per second of process CPU time: what each side costs, unaffected by other processes
    # that take the cores away (a shared machine); on a GPU the wall-clock ratio is the one to read.
    cpu_ratios = [t["tokens_per_cpu_sec"] / p["tokens_per_cpu_sec"] for t, p in zip(trainer_runs, loop_runs)]
    result = {
        "config": shown(configs),
        "overrides": list(overrides),
        "device": first["device"],
        "precision": first["precision"],
        "threads": torch.get_num_threads(),
        "parameters": first["parameters"],
        "batch_size": first["batch_size"],
        "seq_len": first["seq_len"],
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "fresh_processes": fresh_processes,
        "trainer_tokens_per_sec": [r["tokens_per_sec"] for r in trainer_runs],
        "loop_tokens_per_sec": [r["tokens_per_sec"] for r in loop_runs],
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "cpu_ratios": cpu_ratios,
        "median_cpu_ratio": statistics.median(cpu_ratios),
        "spread": {
            "trainer": spread([r["tokens_per_sec"] for r in trainer_runs]),
            "loop": spread([r["tokens_per_sec"] for r in loop_runs]),
            "ratio": spread(ratios),
            "cpu_ratio": spread(cpu_ratios),
        },
        "trainer_peak_memory_bytes": _median_known(r["peak_memory_bytes"] for r in trainer_runs),
        "loop_peak_memory_bytes": _median_known(r["peak_memory_bytes"] for r in loop_runs),
    }
    peak = peak_tflops or (_device_peak(first["device"]) if first["device"].startswith("cuda") else None)
    if peak:
        for name, runs in (("trainer", trainer_runs), ("loop", loop_runs)):
            tflops = statistics.median(r["tokens_per_sec"] for r in runs) * first["flops_per_token"] / 1e12
            result[f"{name}_tflops"], result[f"{name}_mfu"] = tflops, tflops / peak
        result["peak_tflops"] = peak
    return result


def _median_known(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and interquartile range of `values`."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "iqr": quartiles[2] - quartiles[0],
    }


def _fresh(fn: Callable[..., dict], *args) -> dict:
    """`fn(*args)` in a new interpreter (multiprocessing "spawn"), one thread budget as this process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=torch.set_num_threads,
        initargs=(torch.get_num_threads(),),
    ) as pool:  # shut down and joined on exit
        return pool.submit(fn, *args).result()


def _device_peak(device: str) -> Optional[float]:
    from flm_lightning.callbacks.throughput import device_peak_tflops

    return device_peak_tflops(torch.device(device))


def print_report(r: dict) -> None:
    print(
        f"config {r['config']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}: "
        f"{r['parameters'] / 1e6:.2f}M parameters, batch {r['batch_size']} x seq {r['seq_len']}, "
        f"precision {r['precision']}, {r['device']} ({r['threads']} threads), {r['steps']} timed steps "
        f"after {r['warmup']}"
    )
    print(f"{'repeat':>6} {'trainer tokens/s':>17} {'loop tokens/s':>14} {'ratio':>7} {'CPU-time ratio':>15}")
    rows = zip(r["trainer_tokens_per_sec"], r["loop_tokens_per_sec"], r["ratios"], r["cpu_ratios"])
    for i, (t, loop, q, c) in enumerate(rows, 1):
        print(f"{i:>6} {t:>17,.0f} {loop:>14,.0f} {q:>7.3f} {c:>15.3f}")
    print(
        f"{'median':>6} {statistics.median(r['trainer_tokens_per_sec']):>17,.0f} "
        f"{statistics.median(r['loop_tokens_per_sec']):>14,.0f} {r['median_ratio']:>7.3f} "
        f"{r['median_cpu_ratio']:>15.3f}  (trainer / loop)"
    )
    for name, unit in (("trainer", " tokens/s"), ("loop", " tokens/s"), ("ratio", ""), ("cpu_ratio", "")):
        d = r["spread"][name]
        print(
            f"{name:>9}: median {d['median']:,.3f}{unit}, min {d['min']:,.3f}, max {d['max']:,.3f}, IQR {d['iqr']:,.3f}"
        )

    def mib(b):
        return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"

    print(f"peak memory: trainer {mib(r['trainer_peak_memory_bytes'])}, loop {mib(r['loop_peak_memory_bytes'])}")
    if "trainer_mfu" in r:
        print(
            f"MFU at {r['peak_tflops']:g} TFLOP/s peak: trainer {r['trainer_mfu']:.1%} "
            f"({r['trainer_tflops']:.1f} TFLOP/s), "
            f"loop {r['loop_mfu']:.1%} ({r['loop_tflops']:.1f} TFLOP/s)"
        )


# ---- the two contestants -----------------------------------------------------------------------
def _bench_config(values: dict, total_steps: int, logs: str) -> dict:
    """The config for LightningCLI: checkpointing and validation off, logs in a temp folder."""
    trainer = dict(values.get("trainer") or {})
    trainer.update(
        max_steps=total_steps,
        limit_val_batches=0,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    trainer["callbacks"] = [
        c for c in trainer.get("callbacks") or [] if not str(c.get("class_path", "")).endswith(CHECKPOINT_CALLBACKS)
    ]
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
        trainer["logger"] = {**logger, "init_args": {**logger["init_args"], "save_dir": logs}}
    return {**values, "trainer": trainer}


def _build(config: dict, total_steps: int, logs: str):
    from flm_lightning.cli import FLMCLI
    from flm_lightning.data import MixtureDataModule
    from flm_lightning.module import FLMLightningModule

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="LightningCLI's args parameter"
        )  # the tool's own argv is not the CLI's
        return FLMCLI(
            FLMLightningModule,
            MixtureDataModule,
            subclass_mode_data=True,
            run=False,
            save_config_callback=None,
            args=_bench_config(config, total_steps, logs),
        )


class _StepTimer:
    """Wall and process CPU time from the start of step `first` to the start of step `first + steps`."""

    def __init__(self, device: torch.device, first: int, steps: int):
        self.device, self.first, self.last = device, first, first + steps
        self.start = self.end = None

    def at_step_start(self, step: int) -> None:
        if step in (self.first, self.last):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = (time.perf_counter(), time.process_time())
            if step == self.first:
                self.start = now
            else:
                self.end = now


def _trainer_run(config: dict, steps: int, warmup: int, logs: str) -> dict:
    from lightning.pytorch.callbacks import Callback

    release_freed_memory()
    cli = _build(config, warmup + steps + 1, logs)
    device = cli.trainer.strategy.root_device
    timer = _StepTimer(device, warmup, steps)

    class Timing(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.at_step_start(trainer.global_step)

    cli.trainer.callbacks.append(Timing())
    baseline = start_peak_memory(device)
    cli.trainer.fit(cli.model, cli.datamodule)
    return _summary(cli, device, timer, steps, baseline)


def _loop_run(config: dict, steps: int, warmup: int, logs: str) -> dict:
    from flm_lightning.engine import split_micro_batches
    from flm_lightning.objective import freelm_loss
    from flm_lightning.optim import build_scheduler

    release_freed_memory()
    cli = _build(config, warmup + steps + 1, logs)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    device = trainer.strategy.root_device
    dtype = _autocast_dtype(trainer)
    baseline = start_peak_memory(device)
    data.trainer = trainer  # the loader sizes itself from max_steps, as in fit
    data.prepare_data()
    data.setup("fit")
    module.configure_model()  # the same network, init, checkpointing and compile as the trainer's
    model = module.model.to(device)
    if trainer.precision == "bf16-true":
        model.to(torch.bfloat16)
    optimizer = module.build_optimizer()
    scheduler = build_scheduler(optimizer, module.optim_cfg, module.optim_cfg.decay_steps or trainer.max_steps)
    clip = trainer.gradient_clip_val
    micro_batches = data.micro_batches
    # cache_enabled=False as Lightning's precision plugin: the same autocast state (no recompiles).
    autocast = (
        (lambda: torch.autocast(device.type, dtype, cache_enabled=False))
        if dtype and trainer.precision.endswith("mixed")
        else contextlib.nullcontext
    )
    timer = _StepTimer(device, warmup, steps)
    model.train()
    for step, batch in enumerate(data.train_dataloader()):
        timer.at_step_start(step)
        if step == warmup + steps:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # The trainer's normalisation: token-loss sums of the step's micro-batches over the step's tokens.
        tokens = batch["loss_mask"].sum().clamp(min=1)
        for micro in split_micro_batches(batch, micro_batches):
            with autocast():
                logits = model(
                    micro["input_ids"],
                    position_ids=micro.get("position_ids"),
                    attention_mask=micro.get("attention_mask"),
                )
                loss_sum = freelm_loss(logits, micro).loss_sum
            (loss_sum / tokens).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return _summary(cli, device, timer, steps, baseline)


def _autocast_dtype(trainer) -> Optional[torch.dtype]:
    if trainer.precision not in PRECISIONS:
        raise ConfigError(f"bench supports trainer.precision in {sorted(PRECISIONS)}, got {trainer.precision!r}")
    return PRECISIONS[trainer.precision]


def _summary(cli, device: torch.device, timer: _StepTimer, steps: int, baseline: Optional[int]) -> dict:
    if timer.end is None:
        raise ConfigError("bench: the data ran out before the timed steps ended; use fewer --steps or --warmup")
    data, arch = cli.datamodule, cli.model.arch
    tokens = steps * data.global_batch() * data.seq_len
    return {
        "tokens_per_sec": tokens / (timer.end[0] - timer.start[0]),
        "tokens_per_cpu_sec": tokens / (timer.end[1] - timer.start[1]),
        "peak_memory_bytes": peak_memory(device, baseline),
        "device": str(device),
        "precision": cli.trainer.precision,
        "batch_size": data.batch_size,
        "seq_len": data.seq_len,
        "parameters": count_model(arch).parameters,
        "flops_per_token": count_model(arch, data.seq_len).flops_per_token,
    }


# ---- memory ---------------------------------------------------------------------------------------
def release_freed_memory() -> None:
    """Return freed heap to the system so the next run's resident peak is its own."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def start_peak_memory(device: torch.device) -> Optional[int]:
    """Start a peak-memory measurement; on CPU returns the resident bytes it starts from."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    except OSError:
        return None
    rss = _status_kib("VmRSS:")
    return None if rss is None else rss * 1024


def peak_memory(device: torch.device, baseline: Optional[int]) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _status_kib("VmHWM:")
    return None if peak is None or baseline is None else peak * 1024 - baseline
