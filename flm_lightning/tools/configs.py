"""Read the model part of a LightningCLI YAML config without starting Lightning."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig


def load_yaml(path: str | Path) -> dict[str, Any]:
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


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    section = data.get(key) or {}
    if isinstance(section, dict) and "init_args" in section:
        section = section["init_args"] or {}
    if not isinstance(section, dict):
        raise ConfigError(f"config section {key!r} must be a mapping")
    return section


def model_config_from_yaml(path: str | Path) -> tuple[ModelConfig, Optional[int]]:
    """The `model.arch` of a config, and the training sequence length (`data.seq_len`) if set."""
    data = load_yaml(path)
    arch = _section(data, "model").get("arch")
    if not isinstance(arch, dict):
        raise ConfigError(f"config file {path} has no model.arch section")
    seq_len = _section(data, "data").get("seq_len")
    return ModelConfig.from_dict(arch), seq_len
