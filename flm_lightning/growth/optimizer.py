"""AdamW state across a growth event: old moments into the leading block, zeros for new entries."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from flm_lightning.errors import ConfigError

STEP_POLICIES = ("keep", "reset_new")


@torch.no_grad()
def transfer_adam_state(
    old_opt: torch.optim.Optimizer,
    old_model: nn.Module,
    new_opt: torch.optim.Optimizer,
    new_model: nn.Module,
    origin: dict[str, Optional[str]],
    step_policy: str = "keep",
) -> None:
    """Fill `new_opt.state` for the grown model.

    exp_avg / exp_avg_sq: the old values in the leading block, zeros elsewhere. The step count
    is per tensor in torch's AdamW: "keep" gives every tensor the step of its source (fresh
    tensors the largest step seen), "reset_new" gives tensors with no source step 0. Note
    (docs/growth.md, "Optimizer and learning rate"): with the step kept and zero moments, a new entry's
    first update is about
    lr (1 - b1) / sqrt(1 - b2) in size.
    """
    if step_policy not in STEP_POLICIES:
        raise ConfigError(f"optimizer step policy must be one of {list(STEP_POLICIES)}, got {step_policy!r}")
    old_params = dict(old_model.named_parameters())
    old_states = {name: old_opt.state.get(p, {}) for name, p in old_params.items()}
    steps = [s["step"] for s in old_states.values() if "step" in s]
    latest = max(steps, key=float) if steps else None
    for name, param in new_model.named_parameters():
        src = origin.get(name)
        src_state = old_states.get(src, {}) if src else {}
        if "exp_avg" not in src_state and latest is None:
            continue  # the old optimizer never stepped: nothing to carry
        state: dict = {}
        for key in ("exp_avg", "exp_avg_sq"):
            buf = torch.zeros_like(param, memory_format=torch.preserve_format)
            if key in src_state:
                buf[tuple(slice(0, n) for n in src_state[key].shape)] = src_state[key]
            state[key] = buf
        if "step" in src_state:
            state["step"] = src_state["step"].clone()
        elif step_policy == "keep":
            state["step"] = latest.clone()
        else:
            state["step"] = torch.zeros_like(latest)
        new_opt.state[param] = state
