"""Reading and writing the trainer's checkpoints outside Lightning (tools, exports, imports).

Checkpoints are Lightning `.ckpt` files holding plain containers and tensors only, so they
load with `torch.load(weights_only=True)`: nothing in a checkpoint is executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from flm_lightning.errors import CheckpointError, ConfigError
from flm_lightning.model import FLMTransformer, ModelConfig

MODEL_PREFIX = "model."
DATAMODULE_KEY = "TextDataModule"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn file, not a torch file, or pickled code objects
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} has no state_dict: not a checkpoint of this trainer")
    return ckpt


def arch_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> ModelConfig:
    arch = (ckpt.get("hyper_parameters") or {}).get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path} has no hyper_parameters.arch: not a model of a known family")
    try:
        return ModelConfig.from_dict(arch)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its model.arch is not a known family: {e}") from None


def model_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's parameters with the LightningModule's `model.` prefix removed."""
    return {k[len(MODEL_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def model_from_checkpoint(path: str | Path) -> tuple[FLMTransformer, dict[str, Any]]:
    ckpt = load_checkpoint(path)
    arch = arch_from_checkpoint(ckpt, path)
    model = FLMTransformer(arch)
    missing, unexpected = model.load_state_dict(model_weights(ckpt), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match model.arch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), ckpt


def tokenizer_json(ckpt: dict[str, Any]) -> Optional[str]:
    """The tokenizer the checkpoint was trained with (saved by the DataModule), if any."""
    return (ckpt.get(DATAMODULE_KEY) or {}).get("tokenizer_json")


def save_weights_checkpoint(
    path: str | Path, arch: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Optional[str] = None
) -> None:
    """A weights-only checkpoint: `validate --ckpt_path` and `--model.init_from` accept it."""
    import lightning

    ckpt: dict[str, Any] = {
        "state_dict": {MODEL_PREFIX + k: v for k, v in weights.items()},
        "hyper_parameters": {"arch": arch.to_dict()},
        "pytorch-lightning_version": lightning.__version__,
    }
    if tokenizer is not None:
        ckpt[DATAMODULE_KEY] = {"tokenizer_json": tokenizer}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
