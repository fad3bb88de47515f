"""`python -m flm_lightning generate --ckpt CKPT --prompt "..."`: text from a checkpoint (KV cache)."""

from __future__ import annotations

import argparse
import sys

from flm_lightning.errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one saved in the checkpoint)")


def run(args: argparse.Namespace) -> None:
    # Imported here: `--help` and argument errors answer without loading torch.
    import torch
    from tokenizers import Tokenizer

    from flm_lightning.checkpoint import model_from_checkpoint, tokenizer_json
    from flm_lightning.data.tokenizer import EOD_TOKEN, load_tokenizer
    from flm_lightning.generation import SamplingConfig, generate

    model, ckpt = model_from_checkpoint(args.ckpt)
    print(f"{args.ckpt}: step {ckpt.get('global_step', '?')}", file=sys.stderr)  # which weights speak
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    elif tokenizer_json(ckpt):
        tok = Tokenizer.from_str(tokenizer_json(ckpt))
    else:
        raise CheckpointError(f"{args.ckpt} carries no tokenizer; pass --tokenizer tokenizer.json")
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise CheckpointError("--prompt encodes to no tokens")
    cfg = SamplingConfig(
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.repetition_penalty,
        tok.token_to_id(EOD_TOKEN),
        args.seed,
    )
    prompt = torch.tensor([ids] * args.num_samples)
    for row in generate(model, prompt, cfg).tolist():
        print(tok.decode(row))
        print("---")
