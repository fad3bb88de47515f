"""LightningCLI entry point: `python main.py fit|validate|test -c conf/X.yaml [--a.b=c ...]`.

Bad input (an invalid config value, an unknown option, a data problem) ends with one line
`error: ...` naming the field and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Optional

from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from flm_lightning.checkpoint import check_checkpoint_file
from flm_lightning.data import MixtureDataModule
from flm_lightning.errors import EXIT_HALTED, EXIT_USAGE, USER_ERRORS, TrainingHalted
from flm_lightning.module import FLMLightningModule


class FLMCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads hyper-parameters from --ckpt_path next: check the file first, so a torn
        # or corrupted checkpoint is one clear error instead of an unpickling traceback.
        ckpt_path = self.config.get(self.config.get("subcommand") or "", {}).get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(Path(ckpt_path))


def user_error_in(exc: BaseException) -> Optional[BaseException]:
    """The project's own user error in `exc`'s cause/context chain (jsonargparse wraps them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, USER_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def summarize_parser_error(message: str) -> str:
    """One line out of jsonargparse's nested explanation: the full key and the innermost reason."""
    own = re.search(r"(model|data|trainer)\.[\w.]+ (must|is|has) [^\n]*", message)
    if own:
        return own.group(0).strip()
    keys = re.findall(r'[Kk]ey "([^"]+)"', message)
    key = ".".join(dict.fromkeys(keys)) if keys else ""
    expected = re.search(r"Expected a ([^\n]*?)\. Got value: ([^\n]*)", message)
    given = re.search(r"Given value: ([^\n]*)", message)
    choices = re.findall(r"Expected a typing\.Literal\[([^\n]*)\]", message)
    if expected:
        reason = f"expected {expected.group(1)}, got {expected.group(2)!r}"
    elif given:
        reason = f"invalid value {given.group(1)!r}"
        if choices:
            reason += f"; accepted: {', '.join(choices)}"
    else:
        reason = next((line.strip() for line in message.splitlines() if line.strip()), "invalid arguments")
    return f"{key}: {reason}" if key else reason


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


def main(args: Optional[list[str]] = None) -> FLMCLI:
    show_project_logs()
    try:
        return FLMCLI(
            FLMLightningModule,
            MixtureDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except ArgumentError as e:
        own = user_error_in(e)
        print(f"error: {own if own else summarize_parser_error(str(e))}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except TrainingHalted as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_HALTED)
    except Exception as e:
        own = user_error_in(e)
        if own is None:
            raise
        print(f"error: {own}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
