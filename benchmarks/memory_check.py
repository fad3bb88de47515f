"""Measured peak memory of real training steps on CPU against the planner's estimate.

Each configuration runs in a fresh process: the trainer's model, objective and AdamW take
`--steps` steps (fp32, single process) while the process's peak resident memory is tracked
(VmHWM, reset after start-up through /proc/self/clear_refs; glibc is told to return large
blocks to the system at once, so freed tensors leave the RSS). The planner is asked for the
same run: tp = pp = dp = 1, fp32, flash attention (PyTorch's CPU SDPA kernel stores no
attention probabilities), no fixed overhead.

    python benchmarks/memory_check.py [--case NAME ...] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

CASES = {
    "small": (dict(vocab_size=4096, n_layers=4, n_heads=4, hidden_size=256, max_seq_len=256), 8, 256),
    # name: (arch overrides, batch, seq)
    "tiny (conf/tiny.yaml)": (dict(vocab_size=2048, n_layers=4, n_heads=4, hidden_size=128, max_seq_len=128), 16, 128),
    "mid-swiglu": (dict(vocab_size=8192, n_layers=8, n_heads=8, hidden_size=512, max_seq_len=512), 8, 512),
    "mid-gelu-tied": (
        dict(
            vocab_size=8192,
            n_layers=8,
            n_heads=8,
            hidden_size=512,
            max_seq_len=512,
            norm="layernorm",
            activation="gelu",
            bias=True,
            position="xpos",
            tie_embeddings=True,
        ),
        8,
        512,
    ),
    "wide-long": (dict(vocab_size=4096, n_layers=4, n_heads=8, hidden_size=1024, max_seq_len=1024), 4, 1024),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(arch: dict, batch: int, seq: int, steps: int) -> int:
    """Runs in the child: peak bytes above the post-import baseline."""
    import torch

    from flm_lightning.model import FLMTransformer, ModelConfig
    from flm_lightning.objective import freelm_loss
    from flm_lightning.optim import OptimConfig, build_adamw

    torch.manual_seed(0)
    cfg = ModelConfig(**arch)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    data = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch, seq)}

    def train(n_steps: int, warm_cfg: ModelConfig) -> None:
        model = FLMTransformer(warm_cfg)
        opt = build_adamw(model, OptimConfig())
        for _ in range(n_steps):
            freelm_loss(model(data["input_ids"]), data).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    # Warm up on a 1-layer copy: pages in the kernels' code and thread pools, which are not
    # training memory, then measure from the resulting baseline.
    train(1, ModelConfig(**{**arch, "n_layers": 1}))
    gc.collect()
    baseline = _status_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    train(steps, cfg)
    return (_status_kib("VmHWM:") - baseline) * 1024


def estimate(arch: dict, batch: int, seq: int) -> float:
    from flm_lightning.model import ModelConfig
    from flm_lightning.planner import Hardware, Layout, Workload, memory_per_gpu

    memory = memory_per_gpu(
        ModelConfig(**arch),
        Layout(micro_batch=batch, sharding="ddp"),
        Workload(global_batch=batch, seq_len=seq, precision="fp32"),
        Hardware(overhead_gb=0.0),
    )
    return memory.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arch, batch, seq = CASES[args.child]
        print(measure(arch, batch, seq, args.steps))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    print(f"{'config':<24} {'params':>8} {'measured MiB':>13} {'planned MiB':>12} {'planned/measured':>17}")
    for name in args.case or CASES:
        arch, batch, seq = CASES[name]
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        measured = int(out.stdout.strip().splitlines()[-1])
        planned = estimate(arch, batch, seq)
        from flm_lightning.model import ModelConfig, count_model

        params = count_model(ModelConfig(**arch)).parameters
        rows.append(
            {
                "config": name,
                "parameters": params,
                "batch": batch,
                "seq_len": seq,
                "measured_bytes": measured,
                "planned_bytes": planned,
                "ratio": planned / measured,
            }
        )
        print(
            f"{name:<24} {params / 1e6:7.1f}M {measured / 2**20:13.1f} {planned / 2**20:12.1f} "
            f"{planned / measured:17.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
