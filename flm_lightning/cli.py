"""LightningCLI entry point: `python main.py fit|validate|test -c conf/X.yaml [--a.b=c ...]`.

Bad input (an invalid config value, an unknown option, a data problem) ends with one line
`error: ...` naming the field and exit status 2, never a traceback.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from flm_lightning.callbacks.console import FLMModelSummary, RunFacts, StepProgressBar
from flm_lightning.checkpoint import check_checkpoint_file
from flm_lightning.console import (
    _import,
    config_files,
    quiet_third_party,
    show_project_logs,
    summarize_unknown_key,
    yaml_syntax_error,
)
from flm_lightning.data import MixtureDataModule
from flm_lightning.errors import EXIT_HALTED, EXIT_USAGE, USER_ERRORS, ConfigError, TrainingHalted
from flm_lightning.loggers import DEFAULT_ROOT, FLMTensorBoardLogger
from flm_lightning.module import FLMLightningModule

__all__ = ["FLMCLI", "ToolConfig", "load_config", "main", "show_project_logs"]


class FLMCLI(LightningCLI):
    """LightningCLI with the project's folders, console and checks.

    Folders: a run named NAME (the logger's `name`) writes TensorBoard logs to ROOT/NAME/version_N (one per
    `fit`, resumed ones included), its checkpoints to ROOT/NAME/checkpoints and a checkpoint's validation to
    ROOT/NAME/validate_stepS; ROOT is `--trainer.default_root_dir` (default `runs`). A config leaves these
    folders out; an explicit logger `save_dir` or checkpoint `dirpath` still wins.
    """

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads hyper-parameters from --ckpt_path next: check the file first, so a torn
        # or corrupted checkpoint is one clear error instead of an unpickling traceback.
        subcommand = self.config.get("subcommand") or ""
        ckpt_path = self.config.get(subcommand, {}).get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            check_checkpoint_file(Path(ckpt_path))
            if subcommand == "fit":
                check_resume_arch(Path(ckpt_path), self.config[subcommand].get("model"))

    def _section(self, config):
        """The subcommand's part of a config (the whole config when built with run=False, as bench does)."""
        return config[self.subcommand] if self.subcommand else config

    def before_instantiate_classes(self) -> None:
        derive_folders(self._section(self.config), self.subcommand)

    def instantiate_trainer(self, **kwargs: Any):
        config = self._section(self.config_init)
        trainer = config["trainer"]
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.append(FLMModelSummary())
            trainer["enable_model_summary"] = False  # Lightning adds no summary of its own (and says nothing)
        dirpath = next((c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        config_text = self.parser.dump(self.config, skip_none=False) if self.subcommand == "fit" else None
        if config_text is not None:
            config_text = yaml.safe_dump(yaml.safe_load(config_text).get("fit", {}), sort_keys=False)
        callbacks.append(RunFacts(config=config_text, checkpoints=_shown(dirpath) if dirpath else None))
        trainer["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    # ---- console lines around a run ---------------------------------------------------------
    def before_fit(self) -> None:
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path is None:
            refuse_used_checkpoint_folder(self.trainer)
        if self.trainer.is_global_zero:
            print(start_line(self.trainer, self.datamodule, ckpt_path, fit=True), file=sys.stderr, flush=True)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer), flush=True)

    def before_validate(self) -> None:
        if self.trainer.is_global_zero:
            print(
                start_line(self.trainer, self.datamodule, self.config_init["validate"].get("ckpt_path"), fit=False),
                file=sys.stderr,
                flush=True,
            )

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            print(validate_summary(self.trainer), flush=True)


# ---- folders -----------------------------------------------------------------------------------
def _class(class_path: Any) -> Any:
    return _import(class_path) if isinstance(class_path, str) else None


def _is(class_path: Any, base: type) -> bool:
    cls = _class(class_path)
    return isinstance(cls, type) and issubclass(cls, base)


def derive_folders(config, subcommand: str) -> None:
    """Fill in the folders a config leaves out (see FLMCLI): the logger's save_dir, each ModelCheckpoint's
    dirpath, the trainer's default_root_dir, and for validate/test of a checkpoint its own log folder."""
    trainer = config.trainer
    root = trainer.get("default_root_dir") or DEFAULT_ROOT
    trainer.default_root_dir = root
    logger = trainer.get("logger")
    if not (isinstance(logger, Namespace) and _is(logger.get("class_path"), TensorBoardLogger)):
        return
    args = logger.init_args
    if args.get("save_dir") is None:
        args.save_dir = root
    run_dir = Path(args.save_dir) / (args.get("name") or "")
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if (
            isinstance(callback, Namespace)
            and _is(callback.get("class_path"), ModelCheckpoint)
            and callback.init_args.get("dirpath") is None
        ):
            callback.init_args.dirpath = str(run_dir / "checkpoints")
    ckpt_path = config.get("ckpt_path")
    if (
        subcommand in ("validate", "test")
        and ckpt_path
        and _is(logger.class_path, FLMTensorBoardLogger)
        and args.get("version") is None
    ):
        path = resolve_last(run_dir / "checkpoints") if ckpt_path == "last" else Path(ckpt_path)
        step = checkpoint_step(path) if path is not None else None
        if step is not None:
            # Where fit logged this checkpoint's validation: Lightning writes the validation after
            # optimizer step S at step S - 1, so the two val/loss points line up.
            args.at_step = max(step - 1, 0)
            base = f"{subcommand}_step{step}"
            version, n = base, 2
            while (run_dir / version).exists():
                version, n = f"{base}_{n}", n + 1
            args.version = version


def resolve_last(folder: Path) -> Optional[Path]:
    """The checkpoint `--ckpt_path last` resumes: the newest last*.ckpt in the run's checkpoint folder
    (Lightning's rule; the CLI only uses it to name the file before Lightning loads it)."""
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.iterdir() if p.suffix == ".ckpt" and p.stem.startswith("last")]  # last, last-v1
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def checkpoint_step(path: Path) -> Optional[int]:
    """The training step a checkpoint file was saved at; None for a folder or an unreadable file."""
    if not path.is_file():
        return None
    import torch

    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:
        return None
    return int(step) if step is not None else None


def check_resume_arch(path: Path, model) -> None:
    """LightningCLI replaces the config's model by the checkpoint's hyper-parameters when --ckpt_path is a
    file: an architecture the user asked for would be dropped without a word, so a difference is an error
    (a grown run's checkpoint differs from its first-stage config on purpose and passes)."""
    import torch

    from flm_lightning.model import ModelConfig

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = ModelConfig.from_dict(ckpt["hyper_parameters"]["arch"])
    except Exception:
        return  # not ours to judge here: loading reports it
    if (ckpt.get("flm_growth") or {}).get("history"):
        return
    arch = (model or {}).get("arch") if model is not None else None
    ours = ModelConfig(**arch.as_dict()) if isinstance(arch, Namespace) else ModelConfig()
    theirs, mine = saved.function_fields(), ours.function_fields()
    diff = ", ".join(
        f"{k} is {v} in the checkpoint, {mine[k]} in the config" for k, v in theirs.items() if mine[k] != v
    )
    if diff:
        raise ConfigError(f"{path}: model.arch differs from the config's: {diff}")


def refuse_used_checkpoint_folder(trainer) -> None:
    """A new run (no --ckpt_path) must not write into a folder holding another run's checkpoints: its
    last.ckpt would become last-v1.ckpt and `--ckpt_path last` or `runs/NAME/checkpoints/last.ckpt` would
    then name a different run than the user thinks."""
    for callback in trainer.checkpoint_callbacks:
        folder = Path(callback.dirpath) if callback.dirpath else None
        if folder is None or not folder.is_dir():
            continue
        used = sorted(p.name for p in folder.iterdir() if p.suffix == ".ckpt")
        if used:
            last = resolve_last(folder)
            step = checkpoint_step(last) if last is not None else None
            newest = f"; newest {last.name} at step {step}" if last is not None and step is not None else ""
            raise ConfigError(
                f"{_shown(folder)} already holds the checkpoints of an earlier run ({len(used)} "
                f"{'file' if len(used) == 1 else 'files'}{newest}): resume it "
                f"with --ckpt_path last, or start a new run with --trainer.logger.init_args.name=NEW_NAME"
            )


def _shown(path: Any) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _run_dir(trainer) -> Optional[Path]:
    logger = trainer.logger
    return Path(logger.log_dir) if isinstance(logger, TensorBoardLogger) else None


def start_line(trainer, datamodule, ckpt_path: Optional[str], fit: bool) -> str:
    """One line before data and model are prepared: where this run writes, and what is being prepared."""
    parts = []
    logs = _run_dir(trainer)
    if logs is not None:
        parts.append(f"logs {_shown(logs)}")
    callback = trainer.checkpoint_callback
    if fit and callback is not None and callback.dirpath:
        parts.append(f"checkpoints {_shown(callback.dirpath)}")
    if ckpt_path == "last":
        last = resolve_last(Path(callback.dirpath)) if callback is not None and callback.dirpath else None
        parts.append(
            f"resuming {_shown(last)}" if last is not None else "no last checkpoint to resume: starting at step 0"
        )
    elif ckpt_path:
        parts.append(f"checkpoint {ckpt_path}")
    cache = getattr(datamodule, "cache_path", None)
    if isinstance(cache, Path) and not (cache / "manifest.json").is_file():
        parts.append(f"preparing the corpus and its tokenizer into {cache} (first run only)")
    else:
        parts.append("preparing data and model")
    return "; ".join(parts) + " ..."


def _metric(trainer, key: str) -> Optional[str]:
    value = trainer.callback_metrics.get(key)
    return f"{key} {float(value):.4f}" if value is not None else None


def fit_summary(trainer) -> str:
    """The end of a fit: step, final losses, the checkpoint to use next, the TensorBoard command."""
    losses = ", ".join(m for m in (_metric(trainer, "train/loss"), _metric(trainer, "val/loss")) if m)
    lines = [f"done at step {trainer.global_step}" + (f": {losses}" if losses else "")]
    callback = trainer.checkpoint_callback
    if callback is not None:
        saved = callback.last_model_path or callback.best_model_path
        if saved:
            lines.append(f"checkpoint: {_shown(saved)}")
    logs = _run_dir(trainer)
    if logs is not None:
        lines.append(f"TensorBoard: tensorboard --logdir {_shown(logs.parent)}")
    return "\n".join(lines)


def validate_summary(trainer) -> str:
    metrics = ", ".join(
        f"{k} {float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")
    )
    what = _shown(trainer.ckpt_path) if trainer.ckpt_path else "the initial weights"
    lines = [f"validated {what}" + (f": {metrics}" if metrics else "")]
    logs = _run_dir(trainer)
    if logs is not None:
        lines.append(f"TensorBoard: tensorboard --logdir {_shown(logs.parent)} (run {logs.name})")
    return "\n".join(lines)


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
    literal = re.search(r"Expected a typing\.Literal\[([^\n]*)\]\. Got value: ([^\n]*)", message)
    if literal and key:  # a config choice (a Literal field): the words of the config's own check
        return f"{key} must be one of [{literal.group(1)}], got {literal.group(2)!r}"
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


ROOT_KEYS = {
    "trainer": Trainer,
    "model": FLMLightningModule,
    "data": MixtureDataModule,
    "ckpt_path": None,
    "seed_everything": None,
    "optimizer": None,
    "lr_scheduler": None,
    "config": None,
    "print_config": None,
}


# LightningCLI's parser settings of every entry point; allow_abbrev=False: `--trainer.max_step=50` is an
# unknown key, not max_steps.
PARSER_KWARGS = {"exit_on_error": False, "allow_abbrev": False}


def parser_error_message(error: ArgumentError) -> str:
    """The one line for a parse error: the project's own error inside it, else the key and the reason."""
    own = user_error_in(error)
    return str(own) if own else summarize_unknown_key(str(error), ROOT_KEYS) or summarize_parser_error(str(error))


def main(args: Optional[list[str]] = None) -> FLMCLI:
    show_project_logs()
    quiet_third_party()
    for path in config_files(sys.argv[1:] if args is None else args):
        problem = yaml_syntax_error(path)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
    try:
        return FLMCLI(
            FLMLightningModule,
            MixtureDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=PARSER_KWARGS,
            args=args,
        )
    except ArgumentError as e:
        print(f"error: {parser_error_message(e)}", file=sys.stderr)
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


# ---- configs for the tools -----------------------------------------------------------------------
@dataclass
class ToolConfig:
    """A config as `main.py fit` reads it, for a tool: the merged values and the LightningModule built from them."""

    values: dict[str, Any]  # every key with its default filled in; FLMCLI(args=values) accepts it as it is
    model: FLMLightningModule  # as fit builds it: arch, optim and mup normalised and checked; no weights yet

    @property
    def arch(self):
        return self.model.arch

    @property
    def seq_len(self) -> Optional[int]:
        """The training sequence length (`data.init_args.seq_len`), None when the config has no data section."""
        data = self.values.get("data") or {}
        return (data.get("init_args") or {}).get("seq_len")


class _ParseOnlyCLI(FLMCLI):
    """FLMCLI's parser and checks with no side effect: nothing instantiated or seeded, no folder derived."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def config_override(item: str) -> str:
    """A tool's `--set KEY=VALUE` (or `--KEY=VALUE`, as main.py takes it) -> `--KEY=VALUE` for the parser."""
    key, sep, value = item.removeprefix("--").partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    return f"--{key}={value}"


def load_config(configs: Sequence[str], overrides: Sequence[str] = ()) -> ToolConfig:
    """The config that `main.py fit -c CONFIGS[0] -c CONFIGS[1] ... --KEY=VALUE ...` would run, read by the same
    parser: later files overlay earlier ones, `overrides` (KEY=VALUE, the value read as YAML) come last.

    Raises:
        ConfigError: with main.py's one-line message (invalid YAML, unknown key with a suggestion, bad value).
    """
    if not configs:
        raise ConfigError("give a config with -c CONFIG")
    for path in configs:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        problem = yaml_syntax_error(str(path))
        if problem:
            raise ConfigError(problem)
    args = [arg for path in configs for arg in ("-c", str(path))] + [config_override(o) for o in overrides]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # a tool's argv is its own
            # No data module class: LightningCLI then makes `data` optional (any LightningDataModule, its
            # init_args checked all the same), so a model-only config serves the tools that need no data.
            cli = _ParseOnlyCLI(
                FLMLightningModule, None, run=False, save_config_callback=None, parser_kwargs=PARSER_KWARGS, args=args
            )
        values = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
        model = FLMLightningModule(**values["model"])
    except ArgumentError as e:
        raise ConfigError(parser_error_message(e)) from None
    except Exception as e:
        own = user_error_in(e)
        if own is None or own is e:
            raise
        raise own from None
    return ToolConfig(values=values, model=model)
