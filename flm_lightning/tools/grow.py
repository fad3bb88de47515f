"""`python -m flm_lightning grow --ckpt IN --config TARGET.yaml --out OUT`: offline growth between stages.

The way FLM-101B grew 16B -> 51B -> 101B: checkpoint surgery between two runs. The output is a
full training checkpoint (weights, AdamW state, LR schedule, step, masks) that
`python main.py fit -c TARGET.yaml --ckpt_path OUT` resumes (TARGET: one or more `--config` files and
`--set` overrides, read as main.py reads them); the masks ramp from 0 to 1 over
--ramp-steps steps of that run, so the first loss equals the last loss before growing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flm_lightning.checkpoint import MODEL_PREFIX, arch_from_checkpoint, load_checkpoint, model_weights
from flm_lightning.checkpoint import write_atomic
from flm_lightning.cli import config_override, load_config
from flm_lightning.errors import ConfigError
from flm_lightning.growth import transfer_adam_state
from flm_lightning.module import FLMLightningModule
from flm_lightning.optim import LR_POLICIES, OptimConfig
from flm_lightning.tools.configs import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a training checkpoint of the current stage")
    add_config_arguments(parser, help="the next stage's config (its model.arch is the target)")
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--ramp-steps", type=int, default=100)
    parser.add_argument("--depth-mode", choices=("stack", "interleave"), default="stack")
    parser.add_argument("--depth-init", choices=("copy", "random"), default="copy")
    parser.add_argument("--lr-policy", choices=LR_POLICIES, default="rewarmup")
    parser.add_argument("--rewarmup-steps", type=int, default=100)
    parser.add_argument("--optimizer-step", choices=("keep", "reset_new"), default="keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite --out")


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} exists; choose another path or pass --force")
    target = load_config(args.config, args.set).arch
    ckpt = load_checkpoint(args.ckpt)
    arch = arch_from_checkpoint(ckpt, args.ckpt)
    optim_cfg = OptimConfig(**(ckpt["hyper_parameters"].get("optim") or {}))
    module = FLMLightningModule(arch=arch, optim=optim_cfg, mup=ckpt["hyper_parameters"].get("mup"))
    module.configure_model()
    module.on_load_checkpoint(ckpt)  # growth state of earlier stages, masks of a ramp in progress
    module.model.load_state_dict(model_weights(ckpt))
    old_opt = module.build_optimizer()
    if ckpt.get("optimizer_states"):
        old_opt.load_state_dict(ckpt["optimizer_states"][0])
    step = int(ckpt.get("global_step", 0))
    old_model, origin = module.apply_growth(
        target, mode=args.depth_mode, init=args.depth_init, ramp_steps=args.ramp_steps, lr_policy=args.lr_policy,
        rewarmup_steps=args.rewarmup_steps, optimizer_step=args.optimizer_step, seed=args.seed, step=step,
    )
    new_opt = module.build_optimizer()
    transfer_adam_state(old_opt, old_model, new_opt, module.model, origin, args.optimizer_step)
    others = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(MODEL_PREFIX)}
    ckpt["state_dict"] = {**others, **{MODEL_PREFIX + k: v for k, v in module.model.state_dict().items()}}
    if ckpt.get("optimizer_states"):
        ckpt["optimizer_states"] = [new_opt.state_dict()]
    module.on_save_checkpoint(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: torch.save(ckpt, f))
    config = " ".join([*(f"-c {c}" for c in args.config), *(config_override(s) for s in args.set)])
    print(f"grew {sum(p.numel() for p in old_model.parameters()):,} -> {sum(p.numel() for p in module.model.parameters()):,} "
          f"parameters at step {step}; continue with: python main.py fit {config} --ckpt_path {out}")

