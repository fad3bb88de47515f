"""`python -m flm_lightning consolidate --ckpt FOLDER --out FILE`: one weights file from a distributed checkpoint.

A checkpoint saved by FLMParallelStrategy is a folder of shards (any layout). Tools and
single-process runs read one file: this gathers the full weights, the architecture, growth
state and data position into it (not the optimizer; resume training from the folder itself).
"""

from __future__ import annotations

import argparse

from flm_lightning.checkpoint import consolidate_checkpoint, model_weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a distributed checkpoint folder")
    parser.add_argument("--out", required=True, help="the single checkpoint file to write")


def run(args: argparse.Namespace) -> None:
    ckpt = consolidate_checkpoint(args.ckpt, args.out)
    weights = model_weights(ckpt)
    print(
        f"wrote {args.out}: {len(weights)} tensors, {sum(v.numel() for v in weights.values()):,} parameters, "
        f"step {ckpt.get('global_step')}"
    )
