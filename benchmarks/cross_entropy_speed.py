"""Cross-entropy forward + backward on one step's logits: the paths `token_cross_entropy` can take.

    OMP_NUM_THREADS=1 python benchmarks/cross_entropy_speed.py [--tokens 2048] [--vocab 4096] [--repeats 9]

For fp32 and bf16 logits [tokens, vocab] on the CPU: `F.cross_entropy` on an fp32 copy (the plain path)
and `LeanCrossEntropy` with chunks of 2**16 .. 2**24 logits. Prints the median and min wall time and the
median process CPU time (all threads) of each, in ms; every variant's values and gradients are checked
against the plain path first (fp32 reference), so a fast wrong kernel cannot win.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flm_lightning import objective  # noqa: E402


def measure(fn, logits: torch.Tensor, targets: torch.Tensor, repeats: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    walls, cpus = [], []
    for _ in range(repeats + 1):  # the first call warms the allocator and is dropped
        x = logits.detach().clone().requires_grad_(True)
        w, c = time.perf_counter(), time.process_time()
        loss = fn(x, targets)
        loss.sum().backward()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    walls, cpus = walls[1:], cpus[1:]
    return (
        {
            "wall_ms": 1e3 * statistics.median(walls),
            "wall_min_ms": 1e3 * min(walls),
            "cpu_ms": 1e3 * statistics.median(cpus),
        },
        loss.detach(),
        x.grad,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="rows (micro-batch x sequence length)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, logits [{args.tokens}, {args.vocab}]")
    base = torch.randn(args.tokens, args.vocab) * 3
    targets = torch.randint(0, args.vocab, (args.tokens,))
    targets[::37] = objective.IGNORE_INDEX
    saved = dict(objective.LEAN_CE_CHUNK_ELEMENTS)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            logits = base.to(dtype)
            plain, ref_loss, ref_grad = measure(
                lambda x, t: F.cross_entropy(x.float(), t, reduction="none"), logits, targets, args.repeats
            )
            print(
                f"{str(dtype):15s} F.cross_entropy(fp32 copy)   {plain['wall_ms']:8.1f} ms "
                f"(min {plain['wall_min_ms']:.1f})"
                f"  cpu {plain['cpu_ms']:8.1f} ms"
            )
            for power in (16, 17, 18, 19, 20, 22, 24):
                objective.LEAN_CE_CHUNK_ELEMENTS["cpu"] = 2**power
                res, loss, grad = measure(objective.LeanCrossEntropy.apply, logits, targets, args.repeats)
                loss_err = (loss - ref_loss).abs().max().item()
                grad_err = (grad.float() - ref_grad.float()).abs().max().item()
                if loss_err > 1e-4 or grad_err > 2**-7:
                    raise SystemExit(
                        f"LeanCrossEntropy with chunks of 2**{power}: |loss diff| {loss_err:.2e}, "
                        f"|grad diff| {grad_err:.2e} against F.cross_entropy"
                    )
                mark = "  <- default" if 2**power == saved["cpu"] else ""
                print(
                    f"{str(dtype):15s} LeanCrossEntropy chunk 2**{power:<2d}   {res['wall_ms']:8.1f} ms "
                    f"(min {res['wall_min_ms']:.1f})  cpu {res['cpu_ms']:8.1f} ms{mark}"
                )
    finally:
        objective.LEAN_CE_CHUNK_ELEMENTS.clear()
        objective.LEAN_CE_CHUNK_ELEMENTS.update(saved)


if __name__ == "__main__":
    main()
