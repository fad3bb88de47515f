"""`python -m flm_lightning info -c CONFIG [--json]`: parameters and training FLOPs per token."""

from __future__ import annotations

import argparse
import json

from flm_lightning.tools.configs import add_config_arguments, shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, help="a LightningCLI YAML config with model.arch")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _billions(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def run(args: argparse.Namespace) -> None:
    # Imported here: `--help` and argument errors answer without loading torch.
    from flm_lightning.cli import load_config
    from flm_lightning.model import count_model

    config = load_config(args.config, args.set)
    arch = config.arch
    size = count_model(arch, seq_len=config.seq_len)
    if args.json:
        print(json.dumps({"config": shown(args.config), **size.to_dict(), "arch": arch.to_dict()}))
        return
    family = (
        f"{arch.norm}, {arch.activation}, {'bias' if arch.bias else 'no bias'}, {arch.position}, "
        f"{'tied' if arch.tie_embeddings else 'untied'}"
    )
    rows = [
        ("config", shown(args.config)),
        ("architecture", family),
        ("layers / heads / hidden / ffn", f"{arch.n_layers} / {arch.n_heads} / {arch.hidden_size} / {arch.ffn_size}"),
        ("vocab (padded)", f"{arch.vocab_size} ({arch.padded_vocab_size})"),
        ("parameters", f"{_billions(size.parameters)} ({size.parameters:,})"),
        ("non-embedding parameters", f"{_billions(size.non_embedding_parameters)} ({size.non_embedding_parameters:,})"),
        ("training FLOPs per token", f"{size.flops_per_token:.4g} (seq {size.seq_len}; 6N + 12 L d_attn T)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
