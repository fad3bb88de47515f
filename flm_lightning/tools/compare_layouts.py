"""`python -m flm_lightning compare-layouts -c CONFIG --layouts 1x1x1,1x2x1,1x1x2,2x1x1 --steps 10`:
train the same config at several (pp x dp x tp) layouts on this machine and print the per-step
losses side by side, with each layout's largest difference from the first.

Every layout sees the same global batches (`data.global_batch_size`) and the same
initial weights; in fp32 the losses should agree to about 1e-5. Layouts run one after another as
forked local processes (CPU/gloo here, one process per GPU on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import lightning as L

from flm_lightning.errors import ConfigError
from flm_lightning.parallel.dims import SCHEDULES, ParallelDims, check_layout, micro_batches_per_step
from flm_lightning.parallel.launch import run_forked
from flm_lightning.tools.configs import add_config_arguments

Configs = Union[str, Sequence[str]]  # one config file, or several overlaid as `main.py fit -c A -c B`


def config_args(config: Configs) -> list[str]:
    return [arg for c in ([config] if isinstance(config, (str, Path)) else config) for arg in ("-c", str(c))]


def parse_layout(text: str) -> ParallelDims:
    try:
        pp, dp, tp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--layouts: {text!r} is not PPxDPxTP (e.g. 2x2x2)") from None
    return ParallelDims.infer(pp * dp * tp, tp=tp, pp=pp)


class LossRecorder(L.Callback):
    """Per-step training losses and every validation loss of a run."""

    def __init__(self) -> None:
        self.losses: dict[str, list[float]] = {"train": [], "val": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses["train"].append(float(pl_module.last_loss))

    def on_validation_end(self, trainer, pl_module) -> None:
        if "val/loss" in trainer.callback_metrics:
            self.losses["val"].append(float(trainer.callback_metrics["val/loss"]))


def layout_overrides(
    dims: Optional[ParallelDims],
    global_batch: int,
    steps: int,
    schedule: str = "1f1b",
    micro_batches: int = 2,
    accelerator: str = "cpu",
) -> list[str]:
    """CLI overrides that train `steps` steps at `dims` (None: one process, Lightning's default strategy).

    Every layout trains `global_batch` samples a step; pipelines run them as `micro_batches` micro-batches
    per data-parallel rank, other layouts as one."""
    dp = dims.dp if dims is not None else 1
    micro = micro_batches if dims is not None and dims.pp > 1 else 1
    if global_batch % (dp * micro):
        raise ConfigError(f"--global-batch {global_batch} is not divisible by dp x micro-batches = {dp} x {micro}")
    common = [
        f"--trainer.accelerator={accelerator}",
        "--trainer.num_nodes=1",
        "--trainer.callbacks=[]",
        f"--trainer.callbacks+={__name__}.LossRecorder",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.plugins=[]",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.use_distributed_sampler=false",
        "--trainer.precision=32-true",
        f"--data.init_args.batch_size={global_batch // (dp * micro)}",
        f"--data.init_args.global_batch_size={global_batch}",
    ]
    if dims is None:
        return common + ["--trainer.devices=1", "--trainer.strategy=auto"]
    return common + [
        f"--trainer.devices={dims.world_size}",
        "--trainer.strategy=flm_lightning.parallel.FLMParallelStrategy",
        f"--trainer.strategy.init_args.tensor_parallel_size={dims.tp}",
        f"--trainer.strategy.init_args.pipeline_parallel_size={dims.pp}",
        f"--trainer.strategy.init_args.schedule={schedule}",
        f"--trainer.strategy.init_args.stages_per_rank={2 if schedule == 'interleaved1f1b' else 1}",
    ]


def check_config_layout(values: dict, arch, seq_len: Optional[int], dims: ParallelDims) -> None:
    """The strategy's own check (`check_layout`, its messages) of `dims` for a config as main.py reads it
    (`flm_lightning.cli.load_config(...).values`), before any process starts."""
    strategy = values["trainer"]["strategy"]["init_args"]
    data = values["data"]["init_args"]
    micro_batches = micro_batches_per_step(data.get("global_batch_size"), data["batch_size"], dims.dp)
    check_layout(
        dims,
        arch,
        seq_len=seq_len,
        micro_batches=micro_batches,
        schedule=strategy["schedule"],
        stages_per_rank=strategy["stages_per_rank"],
        layout=strategy["layout"],
    )


def train_layout(
    config: Configs,
    overrides: list[str],
    out: Optional[str],
    ckpt_path: Optional[str] = None,
    save_to: Optional[str] = None,
) -> dict[str, list[float]]:
    """Fit `config` with `overrides` in this process (one rank); rank 0 writes the losses to `out`."""
    from flm_lightning.cli import main

    resume = [f"--ckpt_path={ckpt_path}"] if ckpt_path else []
    cli = main(["fit", *config_args(config), *overrides, *resume])
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, LossRecorder))
    if save_to:
        cli.trainer.save_checkpoint(save_to)
    if out and cli.trainer.global_rank == 0:
        Path(out).write_text(json.dumps(recorder.losses))
    return recorder.losses


def run_layout(
    config: Configs,
    dims: ParallelDims,
    extra: list[str],
    workdir: str,
    name: str,
    ckpt_path: Optional[str] = None,
    save_to: Optional[str] = None,
) -> dict[str, list[float]]:
    """Train at `dims` in forked local ranks: {"train": per-step losses of the global batch, "val": [...]}."""
    out = Path(workdir) / f"{name}.json"
    run_forked(
        train_layout,
        dims.world_size,
        config,
        extra,
        str(out),
        ckpt_path,
        save_to,
        log_dir=str(Path(workdir) / f"{name}-logs"),
    )
    return json.loads(out.read_text())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--layouts", default="1x1x1,1x2x1,1x1x2,2x1x1", help="comma-separated PPxDPxTP layouts")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=8, help="samples per step over all dp ranks")
    parser.add_argument(
        "--schedule",
        default="1f1b",
        choices=SCHEDULES,
        help="the strategy's pipeline schedule (interleaved1f1b: 2 stages per rank)",
    )
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step and rank when pp > 1")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--json", help="also write {layout: losses} here")
    parser.add_argument("overrides", nargs="*", help="more overrides after --, as --key=value (the same as --set)")


def run(args: argparse.Namespace) -> None:
    from flm_lightning.cli import config_override, load_config

    layouts = [(text, parse_layout(text)) for text in args.layouts.split(",")]
    overrides = [config_override(item) for item in [*args.set, *args.overrides]]
    extras = {
        text: layout_overrides(dims, args.global_batch, args.steps, args.schedule, args.micro_batches, args.accelerator)
        + overrides
        for text, dims in layouts
    }
    for text, dims in layouts:  # a bad config or layout is one error line here, not one per forked rank
        config = load_config(args.config, extras[text])
        try:
            check_config_layout(config.values, config.arch, config.seq_len, dims)
        except ConfigError as e:
            raise ConfigError(f"layout {text}: {e}") from None
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="flm-layouts-") as workdir:
        for text, dims in layouts:
            extra = extras[text]
            print(f"running {text} ({dims}) ...", flush=True)
            results[text] = run_layout(args.config, dims, extra, workdir, text.replace("x", "_"))["train"]
    names = list(results)
    print("step  " + "  ".join(f"{n:>10}" for n in names))
    for step in range(args.steps):
        print(f"{step:>4}  " + "  ".join(f"{results[n][step]:10.6f}" for n in names))
    base = results[names[0]]
    for name in names[1:]:
        diff = max(abs(a - b) for a, b in zip(base, results[name]))
        print(f"max |loss({name}) - loss({names[0]})| = {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
