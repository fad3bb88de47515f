"""The config arguments every tool that reads a LightningCLI config takes, and a plain YAML reader.

A tool's `-c A.yaml -c B.yaml --set model.arch.n_layers=8` is read by `flm_lightning.cli.load_config`, the
parser of `main.py fit -c A.yaml -c B.yaml --model.arch.n_layers=8`: the same overlays, overrides, checks,
error lines and model normalisation. Light on purpose (no torch, no Lightning): `--help` imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from flm_lightning.errors import ConfigError


def add_config_arguments(
    parser: argparse.ArgumentParser, required: bool = True, help: str = "a LightningCLI YAML config"
) -> None:
    """`-c/--config` (repeatable: later files overlay earlier ones, as in main.py) and `--set KEY=VALUE`."""
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        required=required,
        metavar="CONFIG",
        help=f"{help}; repeat to overlay more files, as `main.py fit -c A -c B`",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted key, as main.py's --KEY=VALUE, e.g. "
        "model.arch.n_layers=8 or data.init_args.batch_size=8 (repeatable; the value is YAML)",
    )


def shown(configs: list[str]) -> str:
    """The config files as one name for reports: `a.yaml + b.yaml`."""
    return " + ".join(str(c) for c in configs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (a growth schedule, for example). LightningCLI configs are read with
    `flm_lightning.cli.load_config` instead, which merges, checks and normalises them as main.py does."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data
