"""`python -m flm_lightning grow --ckpt IN --config TARGET.yaml --out OUT`: offline growth between stages.

The way FLM-101B grew 16B -> 51B -> 101B: checkpoint surgery between two runs. The output is a
full training checkpoint (weights, AdamW state, LR schedule, step, masks) that
`python main.py fit -c TARGET.yaml --ckpt_path OUT` resumes (TARGET: one or more `--config` files and
`--set` overrides, read as main.py reads them); the masks ramp from 0 to 1 over
--ramp-steps steps of that run, so the first loss equals the last loss before growing.

The growth options are the fields of `GrowthSpec` (the same as a `GrowthCallback` stage's), spelled
with dashes: --ramp-steps, --depth-mode, --depth-init, --layer-order, --lr-policy, --rewarmup-steps,
--optimizer-step, --seed. No Lightning hook runs: the growth state is a plain `GrowthState`.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Literal

import torch

from flm_lightning.build import make_optimizer
from flm_lightning.checkpoint import MODEL_PREFIX, arch_from_checkpoint, load_checkpoint, model_weights, write_atomic
from flm_lightning.cli import config_override, load_config
from flm_lightning.errors import ConfigError
from flm_lightning.growth.state import GrowthSpec, GrowthState
from flm_lightning.model import FLMTransformer
from flm_lightning.mup import MuP, MuPConfig, with_base_width
from flm_lightning.optim import OptimConfig
from flm_lightning.tools.configs import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a training checkpoint of the current stage")
    add_config_arguments(parser, help="the next stage's config (its model.arch is the target)")
    parser.add_argument("--out", required=True, help="checkpoint to write")
    hints = typing.get_type_hints(GrowthSpec)
    for f in fields(GrowthSpec):
        option, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        if typing.get_origin(hint) is Literal:
            parser.add_argument(option, choices=typing.get_args(hint), default=f.default)
        elif f.default is not MISSING and f.default is not None:
            parser.add_argument(option, type=type(f.default), default=f.default)
        else:  # layer_order: a JSON list such as '[0, 1, "copy:1", 2]'
            parser.add_argument(option, type=json.loads, default=None, help="a JSON list, e.g. '[0, \"copy:0\", 1]'")
    parser.add_argument("--force", action="store_true", help="overwrite --out")


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} exists; choose another path or pass --force")
    target = load_config(args.config, args.set).arch
    ckpt = load_checkpoint(args.ckpt)
    hparams = ckpt["hyper_parameters"]
    arch = arch_from_checkpoint(ckpt, args.ckpt)
    optim_cfg = OptimConfig(**(hparams.get("optim") or {}))
    mup_cfg = MuPConfig(**hparams["mup"]) if hparams.get("mup") else None
    target = with_base_width(target, mup_cfg)
    spec = GrowthSpec(**{f.name: getattr(args, f.name) for f in fields(GrowthSpec)})

    def build_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
        mup = MuP(mup_cfg, model.config, optim_cfg.lr) if mup_cfg is not None else None
        return make_optimizer(model, optim_cfg, mup)

    model = FLMTransformer(arch)
    model.load_state_dict(model_weights(ckpt))
    growth = GrowthState()
    growth.load_state_dict(ckpt.get("flm_growth") or {})  # earlier stages, a ramp in progress
    old_opt = None
    if ckpt.get("optimizer_states"):
        old_opt = build_optimizer(model)
        old_opt.load_state_dict(ckpt["optimizer_states"][0])
    step = int(ckpt.get("global_step", 0))
    initialize = MuP(mup_cfg, target, optim_cfg.lr).initialize if mup_cfg is not None else None
    grown = growth.grow(
        model, target, spec, step, optimizer=old_opt, build_optimizer=build_optimizer, initialize=initialize
    )
    others = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(MODEL_PREFIX)}
    ckpt["state_dict"] = {**others, **{MODEL_PREFIX + k: v for k, v in grown.model.state_dict().items()}}
    if grown.optimizer is not None:
        ckpt["optimizer_states"] = [grown.optimizer.state_dict()]
    hparams["arch"] = target.to_dict()
    ckpt["flm_growth"] = growth.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: torch.save(ckpt, f))
    config = " ".join([*(f"-c {c}" for c in args.config), *(config_override(s) for s in args.set)])
    print(
        f"grew {sum(p.numel() for p in model.parameters()):,} -> {sum(p.numel() for p in grown.model.parameters()):,} "
        f"parameters at step {step}; continue with: python main.py fit {config} --ckpt_path {out}"
    )
