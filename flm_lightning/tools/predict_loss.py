"""`python -m flm_lightning predict-loss`: fit L(N) = a * N^b + c over finished runs, predict a target.

Inputs, one of:
  --runs DIR [DIR ...]   TensorBoard logs of finished runs (searched recursively). N of a run is its
                         `model/non_embedding_parameters` scalar (logged by the trainer at the start
                         of fit); the loss is `--tag` (default val/loss) at `--at-step`.
  --csv FILE             columns params,loss or params,step,loss.
  --sweep -c CONFIG      train the config (more `-c` overlays and `--set` overrides as in main.py) at
                         each of `--widths` with the trainer itself (`main.py fit`, logs under
                         `--out`/runs), then read those logs.
`--holdout K` leaves the K largest runs out of the fit (default 1 with --sweep); the largest is
then the target, and its loss the actual one. Otherwise the target is `--target CONFIG` or
`--target-params N`; `--actual` gives its known loss. Writes predict_loss.png and .json under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence
from unittest.mock import patch

from flm_lightning.errors import ConfigError, DataError
from flm_lightning.model import count_model
from flm_lightning.mup_experiments import at_width, fit_power_law, parse_widths, plot_prediction, power_law
from flm_lightning.tools.configs import add_config_arguments

PARAMS_TAG = "model/non_embedding_parameters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", nargs="+", help="TensorBoard log folders of finished runs")
    source.add_argument("--csv", help="a CSV with columns params,loss or params,step,loss")
    source.add_argument("--sweep", action="store_true", help="train -c CONFIG at each of --widths first")
    add_config_arguments(parser, required=False, help="the config to sweep (with --sweep)")
    parser.add_argument("--widths", default="32,64,96,128,192,256", help="sweep widths (with --sweep)")
    parser.add_argument("--steps", type=int, default=None, help="sweep: trainer.max_steps (default the config's)")
    parser.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="leave the largest K runs out of the fit; the largest is then the default target "
        "with its actual loss (default 1 with --sweep, else 0)",
    )
    parser.add_argument("--tag", default="val/loss", help="TensorBoard scalar to fit (default val/loss)")
    parser.add_argument(
        "--at-step", type=int, default=None, help="the logged step to read (default the last step every run logged)"
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--target",
        action="append",
        metavar="CONFIG",
        help="a config whose model to predict (repeat to overlay more files)",
    )
    target.add_argument("--target-params", type=float, help="non-embedding parameters of the model to predict")
    parser.add_argument("--actual", type=float, default=None, help="the target's known loss, for the error")
    parser.add_argument("--out", default="runs/predict_loss", help="output folder (sweep logs go under it too)")


# ---- inputs -------------------------------------------------------------------------------------
def read_csv(path: str, at_step: Optional[int]) -> tuple[list[dict], Optional[int]]:
    if not Path(path).is_file():
        raise DataError(f"CSV file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"params", "loss"} <= set(rows[0]):
        raise DataError(f"CSV file {path} needs a header with columns params,loss (and optionally step)")
    try:
        rows = [{k: float(v) for k, v in row.items() if k in ("params", "step", "loss")} for row in rows]
    except (TypeError, ValueError):
        raise DataError(f"CSV file {path} has a non-numeric params, step or loss value") from None
    if "step" in rows[0]:
        step = at_step if at_step is not None else int(max(r["step"] for r in rows))
        rows = [r for r in rows if int(r["step"]) == step]
        if not rows:
            raise DataError(f"CSV file {path} has no rows at step {step}")
        return [{"params": r["params"], "loss": r["loss"]} for r in rows], step
    return [{"params": r["params"], "loss": r["loss"]} for r in rows], at_step


def run_dirs(roots: list[str]) -> list[Path]:
    dirs = []
    for root in roots:
        if not Path(root).is_dir():
            raise DataError(f"run folder {root} does not exist")
        found = sorted({p.parent for p in Path(root).rglob("events.out.tfevents.*")})
        if not found:
            raise DataError(f"run folder {root} holds no TensorBoard event files")
        dirs += found
    return dirs


def read_scalars(path: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        raise DataError(f"run {path} has no scalar {tag!r} (it has: {', '.join(events.Tags()['scalars'])})")
    return {e.step: e.value for e in events.Scalars(tag)}


def read_runs(roots: list[str], tag: str, at_step: Optional[int]) -> tuple[list[dict], int]:
    runs = [(d, read_scalars(d, tag), read_scalars(d, PARAMS_TAG)) for d in run_dirs(roots)]
    if at_step is None:
        common = set.intersection(*(set(losses) for _, losses, _ in runs))
        if not common:
            raise DataError(f"the runs share no logged step of {tag!r}; pick one with --at-step")
        at_step = max(common)
    points = []
    for path, losses, params in runs:
        if at_step not in losses:
            raise DataError(f"run {path} has no {tag!r} at step {at_step} (logged: {sorted(losses)})")
        # The size logged last before the step: a grown run logs its new size when its fit restarts.
        size = params[max((s for s in params if s <= at_step), default=min(params))]
        points.append({"run": str(path), "params": size, "loss": losses[at_step]})
    return points, at_step


# ---- the sweep ----------------------------------------------------------------------------------
def sweep(
    configs: Sequence[str], widths: list[int], steps: Optional[int], out: Path, overrides: Sequence[str] = ()
) -> list[Path]:
    """Train the config (`configs` overlaid, then `overrides`) at each width with the trainer's CLI (`main.py fit`);
    a finished run is reused."""
    from flm_lightning.cli import config_override, load_config
    from flm_lightning.cli import main as fit

    arch = load_config(configs, overrides).arch
    dirs = []
    for width in widths:
        wide = at_width(arch, width)
        run = out / "runs" / f"width{width}"
        dirs.append(run)
        if list(run.glob("events.out.tfevents.*")) and (run / "done").is_file():
            print(f"width {width}: reusing {run}", file=sys.stderr)
            continue
        start = time.perf_counter()
        print(
            f"width {width}: training {count_model(wide).non_embedding_parameters:,} non-embedding parameters",
            file=sys.stderr,
            flush=True,
        )
        args = [
            "fit",
            *(arg for c in configs for arg in ("-c", c)),
            *(config_override(o) for o in overrides),
            f"--model.arch.hidden_size={width}",
            f"--model.arch.n_heads={wide.n_heads}",
            f"--model.arch.head_dim={wide.head_dim}",
            f"--trainer.logger.init_args.save_dir={out / 'runs'}",
            f"--trainer.logger.init_args.name=width{width}",
            "--trainer.logger.init_args.version=",
        ]
        if wide.ffn_hidden_size is not None:
            args.append(f"--model.arch.ffn_hidden_size={wide.ffn_hidden_size}")
        if steps is not None:
            args.append(f"--trainer.max_steps={steps}")
        with patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI warns when sys.argv also holds arguments
            fit(args)
        (run / "done").write_text(f"{time.perf_counter() - start:.1f}\n")
        print(f"width {width}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return dirs


# ---- the fit ------------------------------------------------------------------------------------
def predict(points: list[dict], target_params: float, actual: Optional[float], step: Optional[int], tag: str) -> dict:
    used = [p for p in points if p.get("used", True)]
    a, b, c = fit_power_law([p["params"] for p in used], [p["loss"] for p in used])
    prediction = power_law(target_params, a, b, c)
    result = {
        "a": a,
        "b": b,
        "c": c,
        "tag": tag,
        "step": step,
        "target_params": target_params,
        "prediction": prediction,
        "actual": actual,
        "error_pct": None if actual is None else 100 * (prediction - actual) / actual,
        "fit_rms": (sum((power_law(p["params"], a, b, c) - p["loss"]) ** 2 for p in used) / len(used)) ** 0.5,
        "points": points,
    }
    return result


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    target_params, actual = args.target_params, args.actual
    if args.target:
        from flm_lightning.cli import load_config

        target_params = count_model(load_config(args.target).arch).non_embedding_parameters
    if (args.config or args.set) and not args.sweep:
        raise ConfigError("-c CONFIG and --set go with --sweep (the model to predict is --target CONFIG)")
    if args.sweep:
        if not args.config:
            raise ConfigError("--sweep needs -c CONFIG")
        roots = [str(d) for d in sweep(args.config, parse_widths(args.widths), args.steps, out, args.set)]
        points, step = read_runs(roots, args.tag, args.at_step)
    elif args.csv:
        points, step = read_csv(args.csv, args.at_step)
    else:
        points, step = read_runs(args.runs, args.tag, args.at_step)
    holdout = (1 if args.sweep else 0) if args.holdout is None else args.holdout
    if not 0 <= holdout < len(points):
        raise ConfigError(f"--holdout must be in [0, {len(points) - 1}], got {holdout}")
    points.sort(key=lambda p: p["params"])
    for p in points[len(points) - holdout :]:
        p["used"] = False
    if target_params is None and holdout:
        target_params = points[-1]["params"]
        actual = points[-1]["loss"] if actual is None else actual
    if target_params is None:
        raise ConfigError("give the model to predict: --target CONFIG or --target-params N")
    if not target_params > 0:
        raise ConfigError(f"--target-params must be > 0, got {target_params}")
    result = predict(points, target_params, actual, step, args.tag)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict_loss.json").write_text(json.dumps(result, indent=1))
    plot_prediction(points, result, str(out / "predict_loss.png"))
    print(
        f"L(N) = {result['a']:.4g} * N^{result['b']:.4f} + {result['c']:.4f}  "
        f"(fit on {sum(p.get('used', True) for p in points)} runs at step {step}, rms {result['fit_rms']:.4f})"
    )
    line = f"predicted {args.tag} at N = {target_params:,.0f}: {result['prediction']:.4f}"
    if actual is not None:
        line += f"  actual {actual:.4f}  error {result['error_pct']:+.2f}%"
    print(line)
    print(f"wrote {out / 'predict_loss.png'} and {out / 'predict_loss.json'}")
