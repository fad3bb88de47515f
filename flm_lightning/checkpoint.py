"""The trainer's checkpoint files: crash-safe writing (a Lightning `CheckpointIO` plugin) and
reading them outside Lightning (tools, exports, imports).

Checkpoints are Lightning `.ckpt` files holding plain containers and tensors only, so they
load with `torch.load(weights_only=True)`: nothing in a checkpoint is executed.

    trainer:
      plugins:
        - class_path: flm_lightning.checkpoint.AtomicCheckpointIO

- Atomic: the checkpoint is written to a temporary name in the same folder, flushed to disk
  and renamed over the target, so a process killed while saving leaves the previous file whole.
- Checksummed: a sidecar `NAME.sha256` records the sha256, size and mtime of the file; loading
  verifies it and reports a corrupted file by name together with the other checkpoints
  beside it. (A sidecar older than its file, from a kill between the two renames, is ignored.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flm_lightning.errors import CheckpointError, ConfigError
from flm_lightning.model import FLMTransformer, ModelConfig

SIDECAR = ".sha256"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, writer) -> None:
    """Write through `writer(file)` to a temporary name beside `path`, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify(path: Path) -> None:
    """Raise CheckpointError if `path` does not match its sidecar checksum."""
    sidecar = path.with_name(path.name + SIDECAR)
    if not sidecar.is_file():
        return
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return
    stat = path.stat()
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        if record.get("size") != stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            raise CheckpointError(f"checkpoint {path} is truncated ({stat.st_size} of {record['size']} bytes)")
        return  # the sidecar belongs to an older version of the file
    if _sha256(path) != record.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted (checksum mismatch){_others(path)}")


def check_checkpoint_file(path: Path) -> None:
    """Before anything unpickles it: the sidecar checksum if there is one, else the zip container's
    own CRCs (torch.save writes a zip archive). Raises CheckpointError naming the file."""
    sidecar = path.with_name(path.name + SIDECAR)
    if sidecar.is_file():
        verify(path)
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e}){_others(path)}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted (bad member {bad}){_others(path)}")


def _others(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
    return f"; other checkpoints in {path.parent}: {', '.join(others)}" if others else ""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f))
        stat = path.stat()
        record = {"sha256": _sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        write_atomic(path.with_name(path.name + SIDECAR), lambda f: f.write(json.dumps(record).encode()))

    def load_checkpoint(
        self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        return read_checkpoint(Path(path), map_location)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        sidecar = Path(str(path) + SIDECAR)
        if sidecar.exists():
            sidecar.unlink()


# ---- reading outside Lightning ----------------------------------------------------------------
MODEL_PREFIX = "model."
DATAMODULE_KEY = "TextDataModule"


def read_checkpoint(path: Path, map_location: Optional[Any] = None) -> dict[str, Any]:
    """Checksum-verified, weights-only load; every failure is a CheckpointError naming the file."""
    if is_distributed_checkpoint(path):
        raise CheckpointError(
            f"{path} is a distributed checkpoint folder; make one file of it first: "
            f"python -m flm_lightning consolidate --ckpt {path} --out FILE.ckpt"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist{_others(path)}")
    verify(path)
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:  # torn file, not a torch file, or pickled code objects
        raise CheckpointError(f"checkpoint {path} cannot be read ({str(e).splitlines()[0]}){_others(path)}") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of this trainer (it must hold a state_dict), for tools outside Lightning."""
    path = Path(path)
    ckpt = read_checkpoint(path)
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
    return {k[len(MODEL_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def model_from_checkpoint(path: str | Path) -> tuple[FLMTransformer, dict[str, Any]]:
    ckpt = load_checkpoint(path)
    arch = arch_from_checkpoint(ckpt, path)
    model = FLMTransformer(arch)
    missing, unexpected = model.load_state_dict(model_weights(ckpt), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match model.arch (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
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
    write_atomic(path, lambda f: torch.save(ckpt, f))


# ---- distributed (FLMParallelStrategy) checkpoints --------------------------------------------------
DISTRIBUTED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a DCP checkpoint folder


def is_distributed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / DISTRIBUTED_METADATA).is_file()


def consolidate_checkpoint(folder: str | Path, out: str | Path) -> dict[str, Any]:
    """One weights checkpoint file from a distributed checkpoint folder saved at any layout.

    Keeps the full weights and everything but the optimizer: `validate --ckpt_path`,
    `--model.init_from`, `grow`, `export-hf` and `generate` read it. To continue training at
    another layout, resume from the folder itself: it keeps the (sharded) AdamW state.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder, out = Path(folder), Path(out)
    if not is_distributed_checkpoint(folder):
        raise CheckpointError(
            f"{folder} is not a distributed checkpoint folder (needs .metadata and {DISTRIBUTED_METADATA})"
        )
    meta = torch.load(folder / DISTRIBUTED_METADATA, map_location="cpu", weights_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(out.name + ".dcp.tmp")
    try:
        dcp_to_torch_save(folder, staged)
        tensors = torch.load(staged, map_location="cpu", weights_only=True)
    finally:
        staged.unlink(missing_ok=True)
    ckpt = {k: v for k, v in meta.items() if k not in ("optimizer_states", "lr_schedulers")}
    ckpt["state_dict"] = tensors["state_dict"]
    write_atomic(out, lambda f: torch.save(ckpt, f))
    return ckpt


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as plain containers and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_initial_weights(model: torch.nn.Module, arch: ModelConfig, path: str, sharded: bool = False) -> None:
    """Load the model weights of checkpoint `path` into `model` (`model.init_from`); a sharded (and possibly
    pipeline-pruned) model takes the full tensors it holds a part of.

    Raises:
        ConfigError: the checkpoint's architecture differs from `arch`.
    """
    ckpt = load_checkpoint(path)
    saved = arch_from_checkpoint(ckpt, path)
    if saved.function_fields() != arch.function_fields():
        raise ConfigError(f"model.init_from {path}: model.arch differs from the config's: {saved.differences(arch)}")
    weights = model_weights(ckpt)
    if not sharded:
        model.load_state_dict(weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = set(model.state_dict())
    set_model_state_dict(
        model, {k: v for k, v in weights.items() if k in own}, options=StateDictOptions(full_state_dict=True)
    )
