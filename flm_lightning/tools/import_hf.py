"""`python -m flm_lightning import-hf --model DIR --out CKPT`: a Llama (or exported FLM) model into this trainer."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face model directory (safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint file to write")
    parser.add_argument("--force", action="store_true", help="overwrite --out")


def run(args: argparse.Namespace) -> None:
    # Imported here: `--help` and argument errors answer without loading torch.
    from flm_lightning.hf.convert import import_hf
    from flm_lightning.model import count_model

    arch = import_hf(args.model, args.out, args.force)
    print(f"wrote {args.out}: {count_model(arch).parameters:,} parameters. Continue pre-training with\n"
          f"  python main.py fit -c CONFIG --model.init_from={args.out}  (model.arch must match: "
          f"n_layers={arch.n_layers} hidden_size={arch.hidden_size} n_heads={arch.n_heads} ffn_hidden_size={arch.ffn_size})")
