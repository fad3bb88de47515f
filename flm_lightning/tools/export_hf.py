"""`python -m flm_lightning export-hf --ckpt CKPT --out DIR [--format F]`: a Hugging Face model directory."""

from __future__ import annotations

import argparse

from flm_lightning.hf import EXPORT_FORMATS

HOW_TO_LOAD = {
    "llama": "AutoModelForCausalLM.from_pretrained(DIR)",
    "teleflm": "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) or vLLM's TeleFLM model",
    "flm": "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a checkpoint of this trainer (.ckpt)")
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--tokenizer", help="tokenizer.json to ship (default: the one saved in the checkpoint)")
    parser.add_argument(
        "--format",
        default="auto",
        choices=EXPORT_FORMATS,
        help="auto (default): plain Llama with the multipliers folded in when the network is one, "
        "else flm; teleflm: the Tele-FLM release format, μP kept (weights as trained, "
        "multipliers in config.json)",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def run(args: argparse.Namespace) -> None:
    # Imported here: `--help` and argument errors answer without loading torch.
    from flm_lightning.hf.convert import export_hf

    family = export_hf(args.ckpt, args.out, args.tokenizer, args.force, args.format)
    print(f"wrote {args.out} ({family} format); load it with {HOW_TO_LOAD[family]}")
