"""Validation metrics of the FreeLM objective: token-weighted means over a whole validation epoch.

An epoch value is the loss over all validation tokens (not a mean of batch means). With more
than one validation domain (see `TextDataModule.val_domains`) each domain also gets its loss and
bits per byte, `loss / (ln 2 x bytes per token)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import MeanMetric

from flm_lightning.engine import StepStats


class ValidationLosses(nn.Module):
    """`val/loss`, `val/ppl`, `val/lm_loss`, `val/teacher_loss`, `val/teacher_acc` and per-domain
    `val/<name>/loss`, `val/<name>/bpb` (nats and bits per byte)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss, self.lm_loss = MeanMetric(), MeanMetric()
        self.teacher_loss, self.teacher_acc = MeanMetric(), MeanMetric()
        self.domain_loss = nn.ModuleDict()
        self.domains: list[tuple[str, float]] = []

    def set_domains(self, domains: list[tuple[str, float | None]], device: torch.device) -> None:
        """The validation loaders' (name, bytes per token); loaders without a byte count are left out."""
        self.domains = [(n, b) for n, b in domains if b is not None]
        for name, _ in self.domains:
            if name not in self.domain_loss:
                self.domain_loss[name] = MeanMetric().to(device)

    def update(self, stats: StepStats, dataloader_idx: int = 0) -> None:
        """Add one batch's sums (of validation loader `dataloader_idx`)."""
        if stats.teacher_tokens > 0:
            self.teacher_loss.update(stats.teacher_loss, weight=stats.teacher_tokens)
            self.teacher_acc.update(stats.teacher_acc, weight=stats.teacher_tokens)
        if stats.lm_tokens > 0:
            self.loss.update(stats.lm_loss, weight=stats.lm_tokens)
            self.lm_loss.update(stats.lm_loss, weight=stats.lm_tokens)
            if self.domains:
                self.domain_loss[self.domains[dataloader_idx][0]].update(stats.lm_loss, weight=stats.lm_tokens)

    def compute(self) -> dict[str, torch.Tensor]:
        """The epoch's values (synchronised over processes), in logging order; then resets every metric."""
        out: dict[str, torch.Tensor] = {}
        if self.loss.update_count:
            loss = self.loss.compute()
            out.update({"val/loss": loss, "val/ppl": torch.exp(loss), "val/lm_loss": self.lm_loss.compute()})
        if self.teacher_loss.update_count:
            out.update({"val/teacher_loss": self.teacher_loss.compute(), "val/teacher_acc": self.teacher_acc.compute()})
        if len(self.domains) > 1:  # one domain: val/loss says it all
            for name, bytes_per_token in self.domains:
                metric = self.domain_loss[name] if name in self.domain_loss else None
                if metric is not None and metric.update_count:
                    domain_loss = metric.compute()
                    out[f"val/{name}/loss"] = domain_loss
                    out[f"val/{name}/bpb"] = domain_loss / (math.log(2) * bytes_per_token)
        for metric in (self.loss, self.lm_loss, self.teacher_loss, self.teacher_acc, *self.domain_loss.values()):
            metric.reset()
        return out
