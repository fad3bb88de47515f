"""Checks of a run's settings made before any state exists: the trainer settings the step relies on, the
LR schedule's length and the data's vocabulary against the model's."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L

from flm_lightning.errors import ConfigError, DataError
from flm_lightning.model import ModelConfig


def check_step_settings(trainer: L.Trainer) -> None:
    """Raise ConfigError for trainer settings the step does not use or would get wrong: gradient
    accumulation (use data.global_batch_size), several processes without FLMParallelStrategy, a
    clipping algorithm other than "norm"."""
    from flm_lightning.parallel.strategy import FLMParallelStrategy  # the strategy imports the engine

    if trainer.accumulate_grad_batches != 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not used: set "
            "data.init_args.global_batch_size (samples per optimizer step over all data-parallel ranks); each "
            "step then runs global_batch_size / (batch_size x data-parallel ranks) micro-batches"
        )
    if trainer.world_size > 1 and not isinstance(trainer.strategy, FLMParallelStrategy):
        raise ConfigError(
            f"trainer.strategy: {type(trainer.strategy).__name__} on {trainer.world_size} processes would "
            "normalise each rank's loss by its own tokens; use flm_lightning.parallel.FLMParallelStrategy "
            "(data parallel alone: tensor_parallel_size 1, pipeline_parallel_size 1)"
        )
    if trainer.gradient_clip_algorithm not in (None, "norm"):
        raise ConfigError(f"trainer.gradient_clip_algorithm must be 'norm', got {trainer.gradient_clip_algorithm!r}")


def schedule_length(trainer: L.Trainer, decay_steps: Optional[int] = None) -> int:
    """The LR schedule's length in optimizer steps: model.optim.decay_steps, else the trainer's.

    Raises:
        ConfigError: neither is set (the trainer's steps are unbounded).
    """
    if decay_steps:
        return decay_steps
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ConfigError("set trainer.max_steps (or model.optim.decay_steps): the LR schedule needs a length")
    return int(steps)


def check_vocabulary(arch: ModelConfig, datamodule: Any) -> None:
    """Raise ConfigError when the tokenizer's vocabulary exceeds model.arch.vocab_size, DataError when the
    data holds a token id at or beyond it (datamodules without these attributes are not checked)."""
    data_vocab = getattr(datamodule, "tokenizer_vocab_size", None)
    if data_vocab is not None and data_vocab > arch.vocab_size:
        raise ConfigError(
            f"model.arch.vocab_size ({arch.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({data_vocab}); set model.arch.vocab_size >= {data_vocab}"
        )
    max_id = getattr(datamodule, "max_token_id", None)
    if max_id is not None and max_id >= arch.vocab_size:
        raise DataError(f"the data holds token id {max_id}, beyond model.arch.vocab_size ({arch.vocab_size})")
