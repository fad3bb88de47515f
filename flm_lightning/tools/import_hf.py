"""`python -m flm_lightning import-hf --model DIR --out CKPT`: a Llama, Tele-FLM or FLM model into this trainer."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face model directory (model_type llama, TeleFLM or flm; safetensors or "
        "weights-only .bin, single or sharded)",
    )
    parser.add_argument("--out", required=True, help="checkpoint file to write")
    parser.add_argument("--force", action="store_true", help="overwrite --out")


def run(args: argparse.Namespace) -> None:
    # Imported here: `--help` and argument errors answer without loading torch.
    from flm_lightning.hf.convert import import_hf
    from flm_lightning.model import count_model

    arch = import_hf(args.model, args.out, args.force)
    mup = (
        f" input_mult={arch.input_mult} output_mult={arch.output_mult} base_hidden_size={arch.base_hidden_size}"
        if arch.base_hidden_size is not None or arch.input_mult != 1.0 or arch.output_mult != 1.0
        else ""
    )
    print(
        f"wrote {args.out}: {count_model(arch).parameters:,} parameters. Continue pre-training with\n"
        f"  python main.py fit -c CONFIG --model.init_from={args.out}  (model.arch must match: "
        f"n_layers={arch.n_layers} hidden_size={arch.hidden_size} n_heads={arch.n_heads} "
        f"ffn_hidden_size={arch.ffn_size}{mup})"
    )
