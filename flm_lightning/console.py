"""What the command line prints that is not training itself: error lines and the project's log lines.

Light on purpose (no torch, no Lightning): `python -m flm_lightning --help` and argument errors use it
before any heavy library is imported.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union, get_args, get_origin


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (a StreamHandler would keep a replaced one)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def show_project_logs() -> None:
    """Print the INFO lines of the project's own loggers (attention backend, recompute, compile)
    on rank 0, as Lightning does for its own; the model code uses plain `logging`."""
    log = logging.getLogger("flm_lightning")
    if not log.handlers and int(os.environ.get("RANK", "0")) == 0:
        log.addHandler(_StderrHandler())
        log.setLevel(logging.INFO)


# ---- configuration files ---------------------------------------------------------------------
def config_files(args: Iterable[str]) -> list[str]:
    """The files given with -c/--config, in order."""
    files, args = [], list(args)
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def yaml_syntax_error(path: str) -> Optional[str]:
    """`FILE:LINE:COLUMN: problem` for a config file that is not valid YAML; None when it parses
    (or does not exist: jsonargparse reports a missing file itself)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        return None
    try:
        yaml.safe_load(file.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = " ".join(part for part in (e.problem, f"({e.context})" if e.context else "") if part)
        return f"{where}: invalid YAML: {problem}"
    except yaml.YAMLError as e:
        return f"{path}: invalid YAML: {str(e).splitlines()[0]}"
    return None


# ---- unknown keys ----------------------------------------------------------------------------
def accepted_keys(target: Any) -> list[str]:
    """The option names a class (dataclass fields or __init__ parameters) accepts."""
    if is_dataclass(target):
        return [f.name for f in fields(target)]
    try:
        params = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _nested_class(owner: Any, name: str) -> Any:
    """The class behind parameter `name` of `owner` (Optional[X] -> X), or None."""
    try:
        annotation = inspect.signature(owner).parameters[name].annotation
    except (KeyError, TypeError, ValueError):
        hints = getattr(owner, "__annotations__", {})
        annotation = hints.get(name)
    if get_origin(annotation) is Union:
        annotation = next((a for a in get_args(annotation) if a is not type(None)), None)
    return annotation if inspect.isclass(annotation) else None


def unknown_key_message(key: str, accepted: list[str]) -> str:
    """`unknown key model.arch.n_layer (did you mean n_layers?)`; no suggestion when nothing is close."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, accepted, n=1, cutoff=0.6)
    return f"unknown key {key}" + (f" (did you mean {close[0]}?)" if close else "")


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def summarize_unknown_key(message: str, roots: dict[str, Any]) -> Optional[str]:
    """jsonargparse's explanation of an unknown option -> `unknown key FULL.KEY (did you mean ...?)`.

    Two shapes: a nested class refusing an option ("Parser key "model.arch": ... Problem with given
    class_path 'X': Option 'n_layer' is not accepted") and a plain unrecognized argument
    ("unrecognized arguments: --trainer.max_step=3"); `roots` maps a top-level key to its class.
    """
    refused = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted", message)
    parent = re.search(r'Parser key "([\w.]+)"', message)
    if refused:
        prefix = parent.group(1) if parent else ""
        option = refused.group(2)
        if prefix.endswith(".init_args"):
            prefix = prefix[: -len(".init_args")]
        key = f"{prefix}.{option}" if prefix else option
        target = _import(refused.group(1))
        return unknown_key_message(key, accepted_keys(target) if target is not None else [])
    unrecognized = re.search(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        key = unrecognized.group(1).lstrip("-").split("=", 1)[0]
        parts = [p for p in key.split(".") if p != "init_args"]
        owner = roots.get(parts[0]) if parts else None
        for part in parts[1:-1]:
            owner = _nested_class(owner, part) if owner is not None else None
        accepted = accepted_keys(owner) if owner is not None and len(parts) > 1 else list(roots)
        return unknown_key_message(".".join(parts), accepted)
    return None


# ---- third-party noise -------------------------------------------------------------------------
class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party() -> None:
    """Drop what third-party libraries print on every run that says nothing about it: Lightning's
    "💡 Tip: ... try installing litlogger / litmodels" advertisements, the FutureWarning of torch's
    `LeafSpec` that Lightning's own pytree helper triggers, the non-empty checkpoint folder warning
    on a resume, and two resume/checkpoint warnings that do not apply to this trainer's one-step,
    self-resuming data path. Warnings about the run itself stay."""
    import warnings

    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # The CLI refuses a new run in a used checkpoint folder, so this one only fires when resuming, where it is expected.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Every step is one manual-optimisation training_step, and a checkpoint holds the state after that
    # step's update, as its global_step says: the right state, not the pre-update one Lightning asks about.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # The data modules restore their own position (consumed samples) from the checkpoint.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisements) for f in log.filters):
        log.addFilter(_DropAdvertisements())
