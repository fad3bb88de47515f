"""`python -m flm_lightning coord-check -c CONFIG --widths 64,128,256,512`: μP vs SP activation scales.

Each width (head_dim fixed, heads scaled) trains a few AdamW steps on one fixed random-token batch
with μP (the config's model.mup) and with standard parametrization (default init, one LR, no 1/r
on the logits). Writes coord_check.png (mean |activation| per layer against width, log-log) and
coord_check.json (every value and the per-layer slopes). Under μP the curves stay flat.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flm_lightning.errors import ConfigError
from flm_lightning.mup_experiments import coord_check, parse_widths, plot_coord_check
from flm_lightning.tools.configs import add_config_arguments, shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, help="a config with model.arch and model.mup")
    parser.add_argument("--widths", default="64,128,256,512", help="comma-separated hidden sizes")
    parser.add_argument("--steps", type=int, default=5, help="AdamW steps per width (default 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: the config's model.optim.lr")
    parser.add_argument("--out", default="runs/coord_check", help="output folder (default runs/coord_check)")


def run(args: argparse.Namespace) -> None:
    from flm_lightning.cli import load_config

    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    model = load_config(args.config, args.set).model
    if model.mup_cfg is None:
        raise ConfigError(f"config {shown(args.config)} has no model.mup section (see conf/mup_sweep.yaml)")
    result = coord_check(
        model.arch,
        model.mup_cfg,
        args.lr or model.optim_cfg.lr,
        parse_widths(args.widths),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps({"config": shown(args.config), **result}, indent=1))
    plot_coord_check(result, str(out / "coord_check.png"))
    print(f"{'layer':<12} {'μP slope':>9} {'SP slope':>9}")
    for layer, slope in result["mup"]["slopes"].items():
        print(f"{layer:<12} {slope:>+9.3f} {result['sp']['slopes'][layer]:>+9.3f}")
    print(f"wrote {out / 'coord_check.png'} and {out / 'coord_check.json'}")
