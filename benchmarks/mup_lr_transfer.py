"""Does the best LR transfer across width? μP vs standard parametrization on python-docs.

Each (parametrization, width, LR) trains `--steps` AdamW steps (constant LR, clip 1.0) of
conf/mup_sweep.yaml's model family at `--layers` layers on the same batches of the built-in corpus,
built by the trainer's own module (`flm_lightning.mup_experiments.build_module`). Prints the
final training loss (mean of the last 10 steps) per cell and writes docs/mup/lr_transfer.png.

    OMP_NUM_THREADS=1 python benchmarks/mup_lr_transfer.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import replace

import torch

from flm_lightning.cli import load_config
from flm_lightning.data import TextDataModule
from flm_lightning.mup import MuPConfig
from flm_lightning.mup_experiments import at_width, build_module


def batches(seq_len: int, batch_size: int, steps: int) -> list[torch.Tensor]:
    data = TextDataModule(corpus="python-docs", vocab_size=2048, seq_len=seq_len, batch_size=batch_size)
    data.prepare_data()
    data.setup("fit")
    return [b["input_ids"] for b in itertools.islice(data.train_dataloader(), steps)]


def final_loss(arch, lr: float, mup, data: list[torch.Tensor]) -> float:
    torch.manual_seed(0)
    module, optimizer = build_module(arch, lr, mup)
    losses = []
    for tokens in data:
        logits = module.model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item() if math.isfinite(loss.item()) else float("nan"))
    return sum(losses[-10:]) / 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", default="32,64,128,256")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2,1e-1")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default="docs/mup/lr_transfer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_config(["conf/mup_sweep.yaml"]).arch
    base = replace(base, n_layers=args.layers)
    widths, lrs = [int(w) for w in args.widths.split(",")], [float(x) for x in args.lrs.split(",")]
    data = batches(64, 8, args.steps)
    start = time.perf_counter()
    result = {"widths": widths, "lrs": lrs, "steps": args.steps, "layers": args.layers}
    for name, mup in (("mup", MuPConfig(base_hidden_size=base.hidden_size)), ("sp", None)):
        result[name] = {}
        for width in widths:
            result[name][str(width)] = [final_loss(at_width(base, width), lr, mup, data) for lr in lrs]
            row = "  ".join(f"{x:.3f}" for x in result[name][str(width)])
            print(f"{name:>3} width {width:>4}: {row}   ({time.perf_counter() - start:.0f} s)", flush=True)
    result["seconds"] = time.perf_counter() - start
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (name, title) in zip(axes, (("mup", "μP"), ("sp", "standard parametrization"))):
        for width in widths:
            ax.plot(lrs, result[name][str(width)], marker="o", label=f"width {width}")
        ax.set(xscale="log", xlabel="learning rate", ylabel=f"train loss (last 10 of {args.steps} steps)", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    print(f"wrote {args.out}.png and {args.out}.json ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
