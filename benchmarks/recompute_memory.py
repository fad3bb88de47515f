"""Peak memory and step time with activation checkpointing none / selective / full, and of the
lean bf16 cross-entropy against the plain fp32 one.

Each measurement runs in a fresh process (glibc told to hand large freed blocks back at once,
so the resident peak is the run's own): the trainer's model, objective and fused AdamW take
`--steps` steps on random tokens while the peak resident memory above the start is tracked
(`flm_lightning.tools.bench.start_peak_memory` / `peak_memory`; CUDA: max_memory_allocated).

    python benchmarks/recompute_memory.py [--case NAME ...] [--precision 32-true|bf16-mixed] [--out docs/performance]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

CASES = {
    # name: (arch, batch, seq)
    "tiny (conf/tiny.yaml)": (dict(vocab_size=2048, n_layers=4, n_heads=4, hidden_size=128, max_seq_len=128), 16, 128),
    "mid 69M": (dict(vocab_size=8192, n_layers=8, n_heads=12, hidden_size=768, max_seq_len=512), 4, 512),
}
MODES = ("none", "selective", "full")
CE_CASES = {"32k vocab": (4096, 32000), "100k vocab": (2048, 100352)}  # tokens, vocab


def _train_child(case: str, mode: str, steps: int, precision: str) -> dict:
    import torch

    from flm_lightning.model import FLMTransformer, ModelConfig
    from flm_lightning.objective import freelm_loss
    from flm_lightning.optim import OptimConfig, build_adamw
    from flm_lightning.parallel.compute import apply_activation_checkpointing
    from flm_lightning.tools.bench import peak_memory, release_freed_memory, start_peak_memory

    arch, batch, seq = CASES[case]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tokens = torch.randint(0, arch["vocab_size"], (batch, seq + 1), device=device)
    data = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch, seq, device=device)}
    autocast = (
        (lambda: torch.autocast(device.type, torch.bfloat16)) if precision == "bf16-mixed" else contextlib.nullcontext
    )

    def train(cfg: ModelConfig, n_steps: int) -> float:
        model = FLMTransformer(cfg).to(device)
        apply_activation_checkpointing(model, mode)
        opt = build_adamw(model, OptimConfig())
        start = time.perf_counter()
        for step in range(n_steps):
            if step == 1:
                start = time.perf_counter()
            with autocast():
                loss = freelm_loss(model(data["input_ids"]), data).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / max(n_steps - 1, 1)

    train(ModelConfig(**{**arch, "n_layers": 1}), 1)  # page in kernels and thread pools first
    release_freed_memory()
    baseline = start_peak_memory(device)
    seconds = train(ModelConfig(**arch), steps)
    return {"peak_bytes": peak_memory(device, baseline), "step_seconds": seconds}


def _ce_child(case: str) -> dict:
    import torch
    import torch.nn.functional as F

    from flm_lightning.objective import token_cross_entropy
    from flm_lightning.tools.bench import peak_memory, release_freed_memory, start_peak_memory

    n, vocab = CE_CASES[case]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for name in ("plain fp32", "lean"):
        logits = torch.randn(1, n, vocab, device=device).bfloat16().requires_grad_()
        labels = torch.randint(0, vocab, (1, n), device=device)
        release_freed_memory()
        baseline = start_peak_memory(device)
        if name == "lean":
            loss = token_cross_entropy(logits, labels).mean()
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        out[name] = peak_memory(device, baseline)
        del logits, loss
    out["logits_bytes"] = n * vocab * 2
    return out


def _child(args: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (repeatable)")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--out", help="write recompute_memory.json and .png into this folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps(_train_child(*rest) if kind == "train" else _ce_child(*rest)))
        return
    from flm_lightning.model import ModelConfig, count_model

    rows = []
    print(
        f"{'config':<22} {'params':>8} {'batch x seq':>11} {'recompute':>10} {'peak MiB':>9} {'vs none':>8} "
        f"{'s/step':>7}"
    )
    for case in args.case or CASES:
        arch, batch, seq = CASES[case]
        params = count_model(ModelConfig(**arch)).parameters
        for mode in MODES:
            r = _child(["train", case, mode, args.steps, args.precision])
            none = next(
                (x["peak_bytes"] for x in rows if x["config"] == case and x["recompute"] == "none"), r["peak_bytes"]
            )
            rows.append(
                {
                    "config": case,
                    "parameters": params,
                    "batch": batch,
                    "seq_len": seq,
                    "recompute": mode,
                    "precision": args.precision,
                    **r,
                }
            )
            print(
                f"{case:<22} {params / 1e6:7.1f}M {f'{batch} x {seq}':>11} {mode:>10} {r['peak_bytes'] / 2**20:9.1f} "
                f"{r['peak_bytes'] / none:8.2f} {r['step_seconds']:7.2f}",
                flush=True,
            )
    print(f"\n{'cross-entropy (bf16 logits)':<28} {'logits MiB':>10} {'plain fp32 MiB':>15} {'lean MiB':>9}")
    ce_rows = []
    for case in CE_CASES:
        r = _child(["ce", case])
        ce_rows.append({"case": case, **r})
        print(
            f"{case:<28} {r['logits_bytes'] / 2**20:10.1f} {r['plain fp32'] / 2**20:15.1f} {r['lean'] / 2**20:9.1f}",
            flush=True,
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "recompute_memory.json"), "w") as f:
            json.dump({"recompute": rows, "cross_entropy": ce_rows}, f, indent=1)
        _plot(rows, os.path.join(args.out, "recompute_memory.png"))


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.6))
    for ax, case in zip(axes if len(cases) > 1 else [axes], cases):
        sel = [r for r in rows if r["config"] == case]
        ax.bar([r["recompute"] for r in sel], [r["peak_bytes"] / 2**20 for r in sel], color=["#888", "#4a8", "#48c"])
        for i, r in enumerate(sel):
            ax.text(i, r["peak_bytes"] / 2**20, f"{r['peak_bytes'] / 2**20:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{case}, batch {sel[0]['batch']} x {sel[0]['seq_len']}")
        ax.set_ylabel("peak memory above start (MiB)")
    fig.suptitle(f"Activation checkpointing: peak memory ({rows[0]['precision']}, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
