"""Does growth pay? A grown schedule against the final model trained from scratch.

Both runs use the trainer itself (`main.py fit`) on the same data, batch, tokens and LR
schedule: the grown run is `conf/tiny_growth.yaml` (1.4M -> 3.4M -> 6.4M parameters, token
shares 79/13/8%), the reference is its final architecture from step 0. Training FLOPs are
counted per stage with `count_model` (6N + attention, per token). The result is the ratio
of the FLOPs the scratch run needs to reach the grown run's final validation loss to the
FLOPs the grown run spent; a PNG plots validation loss against FLOPs.

    python benchmarks/growth_pays.py [--out docs/growth] [--steps 1000]
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flm_lightning.model import ModelConfig, count_model  # noqa: E402


def run_fit(config: dict, name: str, workdir: Path) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    print(f"[{name}] training ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "main.py"), "fit", "-c", str(path), "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false"], cwd=ROOT, check=True)
    return Path(sorted(glob.glob(str(workdir / "runs" / name / "version_*")))[-1])


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(run_dir / "events.out.tfevents.*"))[0])
    acc.Reload()
    return [(e.step + 1, e.value) for e in acc.Scalars("val/loss")]


def cumulative_flops(step: int, stages: list[tuple[int, int]], tokens_per_step: int) -> float:
    """FLOPs after `step` optimizer steps; stages = [(first step, flops per token)]."""
    total = 0.0
    for i, (start, fpt) in enumerate(stages):
        end = stages[i + 1][0] if i + 1 < len(stages) else float("inf")
        total += max(0, min(step, end) - start) * tokens_per_step * fpt
    return total


def flops_to_reach(target: float, curve: list[tuple[float, float]]) -> float | None:
    """First FLOPs at which the curve reaches `target`, linearly interpolated between evaluations."""
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return f1 if l0 == l1 else f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/growth", help="where the PNG and JSON go")
    parser.add_argument("--steps", type=int, default=None, help="override max_steps (stage steps scale along)")
    args = parser.parse_args()
    grown_cfg = yaml.safe_load((ROOT / "conf/tiny_growth.yaml").read_text())
    steps = grown_cfg["trainer"]["max_steps"]
    if args.steps:
        for stage in _stages(grown_cfg):
            stage["at_step"] = round(stage["at_step"] * args.steps / steps)
        grown_cfg["trainer"]["max_steps"] = steps = args.steps
    arch = ModelConfig(**grown_cfg["model"]["arch"])
    stage_archs = [arch]
    for stage in _stages(grown_cfg):
        arch = ModelConfig.from_dict({**arch.to_dict(), **stage["arch"]})
        stage_archs.append(arch)
    final = stage_archs[-1]
    seq, batch = grown_cfg["data"]["seq_len"], grown_cfg["data"]["batch_size"]
    tokens_per_step = seq * batch
    fpt = [count_model(a, seq).flops_per_token for a in stage_archs]
    grown_stages = [(0, fpt[0])] + [(s["at_step"], f) for s, f in zip(_stages(grown_cfg), fpt[1:])]
    scratch_stages = [(0, fpt[-1])]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = str(ROOT / ".cache/flm_lightning")
        for cfg, name in ((grown_cfg, "grown"),):
            cfg["trainer"]["logger"]["init_args"].update(save_dir=str(work / "runs"), name=name)
            cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]]
            cfg["trainer"]["enable_checkpointing"] = False
            cfg["data"]["cache_dir"] = cache
        scratch_cfg = json.loads(json.dumps(grown_cfg))
        scratch_cfg["trainer"]["callbacks"] = [c for c in scratch_cfg["trainer"]["callbacks"] if "Growth" not in c["class_path"]]
        scratch_cfg["trainer"]["logger"]["init_args"]["name"] = "scratch"
        scratch_cfg["model"]["arch"].update(hidden_size=final.hidden_size, n_heads=final.n_heads)
        grown_curve = val_curve(run_fit(grown_cfg, "grown", work))
        scratch_curve = val_curve(run_fit(scratch_cfg, "scratch", work))

    g = [(cumulative_flops(s, grown_stages, tokens_per_step), loss) for s, loss in grown_curve]
    r = [(cumulative_flops(s, scratch_stages, tokens_per_step), loss) for s, loss in scratch_curve]
    target = g[-1][1]
    grown_flops = g[-1][0]
    scratch_at_target = flops_to_reach(target, r)
    result = {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "stage_parameters": [count_model(a).parameters for a in stage_archs],
        "stage_starts": [s for s, _ in grown_stages],
        "grown_final_val_loss": target,
        "scratch_final_val_loss": r[-1][1],
        "grown_flops": grown_flops,
        "scratch_flops": r[-1][0],
        "scratch_flops_to_grown_loss": scratch_at_target,
        "flops_saving_factor": scratch_at_target / grown_flops if scratch_at_target else None,
        "grown_curve": g,
        "scratch_curve": r,
    }
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "growth_pays.json").write_text(json.dumps(result, indent=1))
    plot(g, r, target, scratch_at_target, stage_archs, grown_stages, tokens_per_step, out / "growth_pays.png")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("curve")}, indent=1))


def _stages(cfg: dict) -> list[dict]:
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("GrowthCallback"):
            return cb["init_args"]["stages"]
    return []


def plot(g, r, target, scratch_at_target, archs, stages, tokens_per_step, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([f for f, _ in r], [loss for _, loss in r], label=f"from scratch ({count_model(archs[-1]).parameters / 1e6:.1f}M)")
    ax.plot([f for f, _ in g], [loss for _, loss in g],
            label="grown " + " -> ".join(f"{count_model(a).parameters / 1e6:.1f}M" for a in archs))
    for start, _ in stages[1:]:
        ax.axvline(cumulative_flops(start, stages, tokens_per_step), color="grey", ls=":", lw=1)
    ax.axhline(target, color="black", lw=0.8, ls="--")
    if scratch_at_target:
        ax.set_title(f"same loss with {scratch_at_target / g[-1][0]:.2f}x fewer FLOPs when grown")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss")
    ax.set_ylim(min(l for _, l in g + r) - 0.1, min(6.0, max(l for _, l in g + r)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
