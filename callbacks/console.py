"""What a run shows: a progress bar in steps, a model summary without metric modules, the learning rate
once per distinct value, and the run's facts as TensorBoard text.

The CLI adds `StepProgressBar`, `FLMModelSummary` and `RunFacts` itself (unless a config names its own
progress bar or summary); `LearningRateLogger` replaces Lightning's `LearningRateMonitor` in the configs.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelSummary, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count, summarize
from torch import nn
from torchmetrics import Metric

from flm_lightning.loggers import logging_step


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar counting optimizer steps towards `trainer.max_steps` (`steps 148/400`) instead
    of batches of an epoch (`Epoch 0/-2`); without `max_steps` it is Lightning's bar."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0:
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # a resumed run starts where it stopped
            bar.unit = "step"
            bar.set_description("steps")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step >= trainer.max_steps):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar too

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the version is in the log folder's name
        return metrics


def metrics_only(module: nn.Module) -> bool:
    """A module that holds no parameters and only torchmetrics state (or nothing): not part of the model."""
    return not any(True for _ in module.parameters()) and all(
        isinstance(m, (Metric, nn.ModuleDict, nn.ModuleList)) for m in module.modules()
    )


def flops_per_token(trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[tuple[int, int]]:
    """(training FLOPs per token, sequence length) of an FLM module; None for another module."""
    arch = getattr(pl_module, "arch", None)
    if arch is None:
        return None
    from flm_lightning.model import count_model

    seq_len = getattr(trainer.datamodule, "seq_len", None) or arch.max_seq_len
    return count_model(arch, seq_len=seq_len).flops_per_token, seq_len


class FLMModelSummary(ModelSummary):
    """Lightning's model summary without the metric modules (validation means, accuracies) and with the
    training FLOPs per token of the model (Lightning's `Total FLOPs` needs an example input, else 0)."""

    def __init__(self, max_depth: int = 1):
        super().__init__(max_depth=max_depth)
        self.depth = max_depth

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.depth or not trainer.is_global_zero:
            return
        rank_zero_info(summary_table(trainer, pl_module, self.depth))


def summary_table(trainer: L.Trainer, pl_module: L.LightningModule, depth: int = 1) -> str:
    summary = summarize(pl_module, max_depth=depth)
    rows = [("", "Name", "Type", "Params", "Mode")]
    for name, kind, params, training in zip(
        summary.layer_names, summary.layer_types, summary.param_nums, summary.training_modes
    ):
        if not metrics_only(pl_module.get_submodule(name)):
            mode = "train" if training else "eval"
            rows.append((str(len(rows) - 1), name, kind, get_human_readable_count(params), mode))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    rule = "-" * max(len(line) for line in lines)
    total, trainable = summary.total_parameters, summary.trainable_parameters
    footer = [
        (get_human_readable_count(trainable), "Trainable params"),
        (get_human_readable_count(total - trainable), "Non-trainable params"),
        (get_human_readable_count(total), "Total params"),
        (get_formatted_model_size(summary.model_size), "Total estimated model params size (MB)"),
    ]
    flops = flops_per_token(trainer, pl_module)
    if flops is not None:
        footer.append((get_human_readable_count(flops[0]), f"Training FLOPs per token (sequence {flops[1]})"))
    return "\n".join([lines[0], rule, *lines[1:], rule, *(f"{value:<10}{label}" for value, label in footer)])


def lr_tags(groups: list[dict]) -> list[Optional[str]]:
    """One TensorBoard tag per distinct learning rate of an optimizer's groups (None for a group whose
    rate another group already reports): `train/lr` when all share one, else `train/lr/<groups>`.

    AdamW's `decay` and `no_decay` groups differ only in weight decay, so a plain run has one curve.
    """
    rates = list(dict.fromkeys(g["lr"] for g in groups))
    if len(rates) == 1:
        return ["train/lr"] + [None] * (len(groups) - 1)
    names = {}
    for i, g in enumerate(groups):
        name = str(g.get("name", f"group{i}"))
        names.setdefault(g["lr"], []).append(name)
    tags, seen = [], set()
    for g in groups:
        if g["lr"] in seen:
            tags.append(None)
        else:
            seen.add(g["lr"])
            tags.append("train/lr/" + ",".join(dict.fromkeys(names[g["lr"]])))
    return tags


class LearningRateLogger(Callback):
    """The learning rate of each step (before the optimizer step uses it), once per distinct value among
    the parameter groups; written on Lightning's logging steps like the training loss."""

    def __init__(self):
        self._tags: Optional[list[Optional[str]]] = None
        self._shape: Optional[tuple] = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.loggers or not logging_step(trainer, trainer.global_step + 1):
            return
        for optimizer in trainer.optimizers[:1]:
            groups = optimizer.param_groups
            shape = tuple(str(g.get("name", i)) for i, g in enumerate(groups))
            if self._tags is None or shape != self._shape:  # first step, or the optimizer was rebuilt (growth)
                self._tags, self._shape = lr_tags(groups), shape
            for tag, group in zip(self._tags, groups):
                if tag is not None:
                    pl_module.log(tag, float(group["lr"]), on_step=True, on_epoch=False)


class RunFacts(Callback):
    """The run's facts as TensorBoard text (`run/facts`: parameters, FLOPs per token, batch, steps,
    folders; `run/config`: the resolved config), written once at the start of training.

    Args:
        config: the resolved config as YAML text (the CLI passes it).
        checkpoints: the checkpoint folder, shown in the facts.
    """

    def __init__(self, config: Optional[str] = None, checkpoints: Optional[str] = None):
        self.config, self.checkpoints = config, checkpoints

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
        if writer is None or not hasattr(writer, "add_text"):
            return
        step = trainer.global_step
        facts = []
        arch = getattr(pl_module, "arch", None)
        if arch is not None:
            from flm_lightning.model import count_model

            size = count_model(arch)
            facts += [
                ("parameters", f"{size.parameters:,}"),
                ("non-embedding parameters", f"{size.non_embedding_parameters:,}"),
            ]
        flops = flops_per_token(trainer, pl_module)
        if flops is not None:
            facts.append((f"training FLOPs per token (sequence {flops[1]})", f"{flops[0]:,}"))
        batch = getattr(trainer.datamodule, "batch_size", None)
        if batch is not None:
            facts.append(("batch size (per data-parallel rank)", str(batch)))
        facts.append(("max_steps", str(trainer.max_steps)))
        if trainer.ckpt_path:
            facts.append(("resumed from", f"{trainer.ckpt_path} (step {step})"))
        if self.checkpoints:
            facts.append(("checkpoints", self.checkpoints))
        table = "| fact | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in facts)
        writer.add_text("run/facts", table, global_step=step)
        if self.config:
            code = "\n".join("    " + line for line in self.config.splitlines())  # a Markdown code block
            writer.add_text("run/config", code, global_step=step)
