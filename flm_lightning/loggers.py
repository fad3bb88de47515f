"""The TensorBoard logger of the shipped configs: Lightning's, with three differences a pre-training run wants.

- `save_dir` may be left out: the CLI derives it from `--trainer.default_root_dir` (default `runs`), so a
  config never pins a folder and `default_root_dir` / the logger's `name` move everything a run writes.
- `epoch` is not written: a run is measured in steps (`trainer.max_steps`), and Lightning's automatic
  `epoch` scalar would be the first chart TensorBoard shows.
- `at_step` writes every metric at one fixed step: `validate` of a checkpoint logs at the checkpoint's
  training step, so its validation loss lines up with the training run's.

A start that fails before anything was logged (a bad config value found in `setup`, a data error)
leaves no empty `version_N` folder behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    import lightning as L

DEFAULT_ROOT = "runs"


class FLMTensorBoardLogger(TensorBoardLogger):
    """TensorBoard logs in `<save_dir>/<name>/<version>` (see the module docstring).

    Args:
        save_dir: root folder; None: the trainer's `default_root_dir`, else `runs` (set by the CLI).
        name: the run's name; its checkpoints go to `<save_dir>/<name>/checkpoints`.
        version: the sub-folder; None: the next `version_N`.
        default_hp_metric: write Lightning's placeholder `hp_metric` (off: it is a meaningless -1).
        at_step: write every metric at this step (None: the trainer's step).
        **kwargs: the other arguments of Lightning's `TensorBoardLogger`.
    """

    def __init__(
        self,
        save_dir: Optional[str] = None,
        name: Optional[str] = "lightning_logs",
        version: Optional[int | str] = None,
        default_hp_metric: bool = False,
        at_step: Optional[int] = None,
        **kwargs: Any,
    ):
        super().__init__(
            save_dir or DEFAULT_ROOT, name=name, version=version, default_hp_metric=default_hp_metric, **kwargs
        )
        self.at_step = at_step
        self._wrote_metrics = False
        self._folder_existed: Optional[bool] = None

    @property
    def experiment(self):
        if self._folder_existed is None:  # before the writer creates it
            self._folder_existed = Path(self.log_dir).exists()
        return super().experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not metrics:
            return
        self._wrote_metrics = True
        super().log_metrics(metrics, self.at_step if self.at_step is not None else step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "success" or self._wrote_metrics or self._folder_existed is not False:
            return
        # A failed start: the folder holds only what setup wrote (an empty event file, config.yaml).
        folder = Path(self.log_dir)
        shutil.rmtree(folder, ignore_errors=True)
        parent = folder.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def logging_step(trainer: L.Trainer, steps_done: int) -> bool:
    """Whether Lightning's logger writes the values logged now, `steps_done` optimizer steps into the run.

    Lightning writes step values every `trainer.log_every_n_steps` optimizer steps and drops the
    ones logged in between, so per-step work done only to be logged can be skipped off these steps.
    """
    n = trainer.log_every_n_steps
    return n > 0 and steps_done % n == 0


def write_step_metrics(loggers: list[Any], trainer: L.Trainer, step: int, metrics: Callable[[], dict]) -> None:
    """Write one optimizer step's values, and only them (`metrics()`, computed only then), on logging steps,
    at Lightning's step index `step` (the step's index before it ran)."""
    if loggers and logging_step(trainer, step + 1):
        values = metrics()
        for logger in loggers:
            logger.log_metrics(values, step=step)


def log_model_size(logger: Any, arch: Any, step: int) -> None:
    """Write `model/parameters` and `model/non_embedding_parameters` of `arch` (a ModelConfig) at `step`."""
    if logger is None:
        return
    from flm_lightning.model import count_model

    size = count_model(arch)
    logger.log_metrics(
        {"model/parameters": size.parameters, "model/non_embedding_parameters": size.non_embedding_parameters},
        step=step,
    )
