"""Where the time of one training step goes: this trainer's model and loss against LitGPT's, by operator.

    .cache/litgpt-venv/bin/python benchmarks/peer_model_profile.py [--precision bf16-mixed] [--repeats 10]
        [--profile-steps 3] [--json OUT.json]

Run it with the Python of the LitGPT environment that `benchmarks/litgpt_peer.py` installs (it holds both
LitGPT and this project's torch and Lightning; this checkout is put on the path). The shape is
`litgpt_peer.py`'s (conf/tiny.yaml with the 5.3M Llama overrides, micro-batch 8 x 256 tokens). Both models
are built in this one process with the same parameter count (checked); each step is forward, the side's own
loss (ours: `token_cross_entropy`; LitGPT: `chunked_cross_entropy`, 128-token chunks) and backward, under
`torch.autocast("cpu", bfloat16, cache_enabled=False)` for bf16-mixed (as Lightning does). No optimizer,
no data loading, no trainer: this isolates the model and the loss from everything `litgpt_peer.py` times.

Measured: process CPU time per step (alternating sides, median and min over --repeats), which a busy
machine disturbs less than wall time; then `torch.profiler` over --profile-steps steps of each side, and a
table of the operators whose self CPU time per step differs most.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=str(REPO / "conf" / "tiny.yaml"))
    parser.add_argument("--precision", default="bf16-mixed", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per side")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="operators in the difference table")
    parser.add_argument("--json", help="write the figures and both operator tables here")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        from litgpt.model import GPT, Config
        from litgpt.utils import chunked_cross_entropy
    except ImportError:
        raise SystemExit(
            "error: LitGPT is not importable; run with .cache/litgpt-venv/bin/python "
            "(python benchmarks/litgpt_peer.py installs it)"
        )
    from litgpt_peer import DEFAULT_SETS, litgpt_model_config, resolve_config, shape_of

    from flm_lightning.model import FLMTransformer
    from flm_lightning.objective import token_cross_entropy

    shape = shape_of(resolve_config(args.config, DEFAULT_SETS))
    torch.manual_seed(shape.seed)
    ours = FLMTransformer(shape.arch)
    theirs = GPT(Config(**litgpt_model_config(shape.arch)))
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    if counts[0] != counts[1]:
        raise SystemExit(f"error: parameter counts differ: ours {counts[0]}, LitGPT {counts[1]}")
    x = torch.randint(0, shape.arch.vocab_size, (shape.batch_size, shape.seq_len))
    y = torch.randint(0, shape.arch.vocab_size, (shape.batch_size, shape.seq_len))
    bf16 = args.precision == "bf16-mixed"

    def step_ours():
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False, enabled=bf16):
            loss = token_cross_entropy(ours(x), y).mean()
        loss.backward()

    def step_theirs():
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False, enabled=bf16):
            loss = chunked_cross_entropy(theirs(x), y)
        loss.backward()

    sides = {"ours": step_ours, "litgpt": step_theirs}
    for fn in sides.values():  # warm-up
        fn(), fn()
    cpu = {name: [] for name in sides}
    for i in range(args.repeats):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in order:
            start = time.process_time()
            sides[name]()
            cpu[name].append(1e3 * (time.process_time() - start))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, "
        f"{counts[0]:,} parameters, batch {shape.batch_size} x {shape.seq_len}"
    )
    summary = {}
    for name, values in cpu.items():
        summary[name] = {"cpu_ms_median": statistics.median(values), "cpu_ms_min": min(values)}
        print(
            f"{name:7s} CPU time per step (forward + loss + backward): median {statistics.median(values):.0f} ms, "
            f"min {min(values):.0f} ms over {args.repeats}"
        )
    ratio = summary["litgpt"]["cpu_ms_median"] / summary["ours"]["cpu_ms_median"]
    print(f"ours / LitGPT throughput by CPU time: {ratio:.3f}")

    tables = {}
    for name, fn in sides.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                fn()
        tables[name] = {
            e.key: {
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / args.profile_steps,
                "calls_per_step": e.count / args.profile_steps,
            }
            for e in prof.key_averages()
        }
    names = sorted(
        set(tables["ours"]) | set(tables["litgpt"]),
        key=lambda n: (
            -abs(
                tables["ours"].get(n, {}).get("self_cpu_ms_per_step", 0)
                - tables["litgpt"].get(n, {}).get("self_cpu_ms_per_step", 0)
            )
        ),
    )
    print(
        f"\n{'operator':52s} {'ours ms':>8s} {'calls':>6s} {'LitGPT ms':>9s} {'calls':>6s} {'diff ms':>8s}  (per step)"
    )
    for n in names[: args.top]:
        a, b = tables["ours"].get(n, {}), tables["litgpt"].get(n, {})
        am, bm = a.get("self_cpu_ms_per_step", 0.0), b.get("self_cpu_ms_per_step", 0.0)
        print(
            f"{n[:52]:52s} {am:8.1f} {a.get('calls_per_step', 0):6.0f} {bm:9.1f} {b.get('calls_per_step', 0):6.0f} "
            f"{am - bm:+8.1f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "precision": args.precision,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "parameters": counts[0],
                    "cpu_ms": cpu,
                    "summary": summary,
                    "ours_over_litgpt": ratio,
                    "operators": tables,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
