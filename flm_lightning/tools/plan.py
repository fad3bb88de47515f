"""`python -m flm_lightning plan`: per-GPU memory, FLOPs and time of a run or a growth schedule.

plan -c CONFIG --gpus N --gpu-memory GB --peak-tflops T [--tp --pp --dp ...]   one layout, or
                                                                               a ranked list of those that fit
plan --schedule SCHEDULE.yaml                                                  a growth schedule
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig, count_model
from flm_lightning.parallel.dims import SCHEDULES
from flm_lightning.planner import (
    GIB,
    RECOMPUTE,
    SHARDING,
    Hardware,
    Layout,
    RunPlan,
    Stage,
    Workload,
    plan_run,
    plan_schedule,
    rank_layouts,
)
from flm_lightning.tools.configs import add_config_arguments, load_yaml, shown

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(value: Any, name: str) -> float:
    """245.37e9, '245.37e9' or '245.37B' -> 245.37e9 (YAML 1.1 reads 245.37e9 as a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?\d+)?)\s*([KMBGT]?)\s*", str(value))
        if not match:
            raise ConfigError(f"{name}: {value!r} is not a number (examples: 2.5e12, 245.37B)")
        result = float(match.group(1)) * _SUFFIX.get(match.group(2), 1.0)
    if result < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False, help="a LightningCLI YAML config with model.arch")
    parser.add_argument("--schedule", help="a growth schedule YAML (see conf/plans/)")
    parser.add_argument("--gpus", type=int, help="number of GPUs")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument(
        "--peak-tflops", type=float, default=312.0, help="dense bf16 peak per GPU (default 312, A100/A800)"
    )
    parser.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation (default 0.5)")
    parser.add_argument("--achieved-tflops", type=float, help="measured model TFLOP/s per GPU; overrides peak x MFU")
    parser.add_argument("--tp", type=int)
    parser.add_argument("--pp", type=int)
    parser.add_argument("--dp", type=int)
    parser.add_argument("--microbatch", type=int, help="sequences per micro-batch")
    parser.add_argument("--recompute", choices=RECOMPUTE)
    parser.add_argument("--sharding", choices=SHARDING, default="distributed-optimizer")
    parser.add_argument(
        "--pp-schedule",
        choices=SCHEDULES,
        default="1f1b",
        help="the strategy's schedule (trainer.strategy.init_args.schedule)",
    )
    parser.add_argument(
        "--stages-per-rank",
        type=int,
        default=1,
        help="pipeline stages per rank, >= 2 for interleaved1f1b (trainer.strategy.init_args.stages_per_rank)",
    )
    parser.add_argument("--global-batch", type=int, default=1024, help="sequences per optimizer step (default 1024)")
    parser.add_argument("--seq-len", type=int, help="default: the config's data.seq_len or max_seq_len")
    parser.add_argument("--tokens", default="0", help="training tokens, e.g. 2T or 26.54e9")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-flash", action="store_true", help="attention stores its probabilities")
    parser.add_argument("--overhead-gb", type=float, default=3.0, help="fixed per-GPU overhead (default 3 GiB)")
    parser.add_argument("--gpu-hour-cost", type=float, help="price of one GPU-hour, for the cost column")
    parser.add_argument("--top", type=int, default=10, help="layouts to list when ranking")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> None:
    if bool(args.config) == bool(args.schedule):
        raise ConfigError("give either -c CONFIG or --schedule FILE")
    if args.schedule:
        result = plan_schedule(load_schedule(args.schedule))
        print(json.dumps(result, indent=1) if args.json else format_schedule(result))
        return
    from flm_lightning.cli import load_config

    config = load_config(args.config, args.set)
    arch, name = config.arch, shown(args.config)
    seq_len = args.seq_len or config.seq_len or arch.max_seq_len
    for name, value in (("--gpus", args.gpus), ("--global-batch", args.global_batch), ("--seq-len", seq_len)):
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    hardware = Hardware(
        args.gpu_memory, args.peak_tflops, args.mfu, args.achieved_tflops, args.overhead_gb, args.gpu_hour_cost
    )
    workload = Workload(
        args.global_batch, seq_len, parse_count(args.tokens, "--tokens"), args.precision, not args.no_flash
    )
    fixed = {
        k: v
        for k, v in (
            ("tp", args.tp),
            ("pp", args.pp),
            ("dp", args.dp),
            ("micro_batch", args.microbatch),
            ("recompute", args.recompute),
        )
        if v is not None
    }
    fixed.update(sharding=args.sharding, schedule=args.pp_schedule, stages_per_rank=args.stages_per_rank)
    size = count_model(arch, seq_len)
    if args.tp and args.pp:
        dp = args.dp or args.gpus // (args.tp * args.pp)
        layout = Layout(
            args.tp,
            args.pp,
            dp,
            args.microbatch or 1,
            args.recompute or "none",
            args.sharding,
            args.pp_schedule,
            args.stages_per_rank,
        )
        if layout.gpus != args.gpus:
            raise ConfigError(f"tp x pp x dp = {layout.gpus} does not equal --gpus {args.gpus}")
        plan = plan_run(arch, layout, workload, hardware, size)
        if args.json:
            print(json.dumps({"config": name, "parameters": size.parameters, **plan.to_dict()}, indent=1))
        else:
            print(format_plan(name, size.parameters, plan, workload, hardware))
        return
    plans = rank_layouts(arch, args.gpus, workload, hardware, fixed)
    if args.json:
        print(
            json.dumps(
                {"config": name, "parameters": size.parameters, "fitting": [p.to_dict() for p in plans]}, indent=1
            )
        )
    else:
        print(format_ranking(name, size.parameters, plans[: args.top], len(plans), args.gpus, hardware))


# ---- growth schedules ---------------------------------------------------------------------
def _arch(here: Path, value: Any, where: str) -> ModelConfig:
    """The model.arch of a schedule's `config`: one file or a list of overlays (relative to the schedule), read
    as main.py reads them."""
    from flm_lightning.cli import load_config

    files = value if isinstance(value, list) else [value]
    if not files or not all(isinstance(f, str) for f in files):
        raise ConfigError(f"{where} must be a config file or a list of them")
    return load_config([str(here / f) for f in files]).arch


def load_schedule(path: str) -> list[Stage]:
    data = load_yaml(path)
    here = Path(path).parent
    base_arch = None
    if data.get("base_config"):
        base_arch = _arch(here, data["base_config"], f"{path}: base_config")
    hardware = Hardware(**_mapping(data, "hardware", path))
    workload = _mapping(data, "workload", path)
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    result = []
    for i, entry in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(entry, dict) or "tokens" not in entry:
            raise ConfigError(f"{where} must be a mapping with at least 'tokens'")
        arch = _arch(here, entry["config"], f"{where}.config") if entry.get("config") else base_arch
        if arch is None:
            raise ConfigError(f"{where} has no 'config' and the schedule no 'base_config'")
        arch = ModelConfig.from_dict({**arch.to_dict(), **_mapping(entry, "arch", where)})
        stage_workload = {**workload, **_mapping(entry, "workload", where)}
        tokens = parse_count(entry["tokens"], f"{where}.tokens")
        stage_hardware = replace(hardware, **{k: entry[k] for k in ("achieved_tflops", "mfu") if k in entry})
        result.append(
            Stage(
                name=str(entry.get("name", f"stage{i}")),
                arch=arch,
                tokens=tokens,
                layout=Layout(**_mapping(entry, "layout", where)),
                workload=Workload(tokens=tokens, **{k: v for k, v in stage_workload.items() if k != "tokens"}),
                hardware=stage_hardware,
            )
        )
    return result


def _mapping(data: dict, key: str, where: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping")
    return value


# ---- text output --------------------------------------------------------------------------
def _gib(plan: RunPlan) -> str:
    m = plan.memory.gib()
    parts = ["parameters", "gradients", "optimizer", "activations", "logits", "overhead"]
    return " + ".join(f"{k} {m[k]:.1f}" for k in parts) + f" = {m['total']:.1f} GiB"


def format_plan(config: str, parameters: int, plan: RunPlan, workload: Workload, hardware: Hardware) -> str:
    lay = plan.layout
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    rows = [
        (
            "model",
            f"{config}: {parameters / 1e9:.2f}B parameters, {plan.flops_per_token:.3g} FLOPs/token "
            f"(seq {workload.seq_len})",
        ),
        (
            "layout",
            f"TP{lay.tp} PP{lay.pp} DP{lay.dp} ({lay.gpus} GPUs), micro-batch {lay.micro_batch}, "
            f"{plan.micro_batches} micro-batches/step, {lay.schedule}, recompute {lay.recompute}, {lay.sharding}",
        ),
        ("memory per GPU", f"{_gib(plan)} of {hardware.gpu_memory_gb:g} -> {verdict}"),
        (
            "step",
            f"{workload.global_batch * workload.seq_len / 1e6:.2f}M tokens, {plan.flops_per_step:.3g} FLOPs, "
            f"pipeline bubble {plan.bubble:.1%}",
        ),
        (
            "time",
            f"{plan.steps} steps, {plan.days:.2f} days at {plan.tflops_per_gpu:.1f} TFLOP/s per GPU ({plan.notes[0]})"
            if plan.steps
            else "give --tokens for a time estimate",
        ),
    ]
    if plan.cost is not None:
        rows.append(("cost", f"{plan.cost:,.0f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_ranking(
    config: str, parameters: int, plans: list[RunPlan], n_fit: int, gpus: int, hardware: Hardware
) -> str:
    lines = [
        f"{config}: {parameters / 1e9:.2f}B parameters on {gpus} GPUs of {hardware.gpu_memory_gb:g} GiB; "
        f"{n_fit} layouts fit" + ("" if n_fit else " (try more GPUs, full recompute or fsdp sharding)")
    ]
    if plans:
        lines.append(f"{'rank':>4}  {'layout':<44} {'GiB/GPU':>8} {'bubble':>7} {'days':>8}")
        for i, p in enumerate(plans, 1):
            days = f"{p.days:8.2f}" if p.steps else "       -"
            lines.append(f"{i:>4}  {p.layout.describe():<44} {p.memory.total / GIB:8.1f} {p.bubble:7.1%} {days}")
    return "\n".join(lines)


def format_schedule(result: dict) -> str:
    lines = [
        f"{'stage':<8} {'params':>9} {'tokens':>9} {'layout':<18} {'GiB/GPU':>8} {'fits':>5} {'TFLOP/s':>8} "
        f"{'FLOPs':>10} {'days':>7}"
    ]
    for s in result["stages"]:
        lay = s["layout"]
        lines.append(
            f"{s['name']:<8} {s['parameters'] / 1e9:8.2f}B {s['tokens'] / 1e9:8.2f}B "
            f"{'TP%d PP%d DP%d' % (lay['tp'], lay['pp'], lay['dp']):<18} {s['memory_gib']['total']:8.1f} "
            f"{'yes' if s['fits'] else 'NO':>5} {s['tflops_per_gpu']:8.1f} {s['flops']:10.3g} {s['days']:7.2f}"
        )
    total, scratch = result["total"], result["from_scratch"]
    lines.append(
        f"{'total':<8} {'':>9} {total['tokens'] / 1e9:8.2f}B {'':<18} {'':>8} {'':>5} {'':>8} "
        f"{total['flops']:10.3g} {total['days']:7.2f}"
    )
    lines.append(
        f"final model from scratch on the same tokens: {scratch['flops']:.3g} FLOPs, {scratch['days']:.2f} days"
    )
    lines.append(
        f"grown / from scratch: FLOPs {result['flops_ratio']:.1%}, time {result['time_ratio']:.1%} "
        f"(saving {1 - result['time_ratio']:.1%})"
    )
    if total["cost"] is not None:
        lines.append(f"cost: {total['cost']:,.0f} grown vs {scratch['cost']:,.0f} from scratch")
    return "\n".join(lines)
