"""One training or evaluation step of the FreeLM objective on any (pp, dp, tp) layout.

Losses are normalised by the number of trained tokens of the whole global batch, so every
layout optimises (and logs) exactly what one process would: sum of token losses / tokens.
Each rank back-propagates `local sum * dp / global tokens`; FSDP's dp average and the
pipeline's micro-batch sum (scale_grads=False) then give the global per-token mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from flm_lightning.errors import ConfigError
from flm_lightning.objective import LossParts, freelm_loss, token_cross_entropy
from flm_lightning.parallel.dims import ParallelDims


@dataclass
class StepResult:
    loss: torch.Tensor  # global per-token mean over the whole batch, on every rank
    tokens: torch.Tensor  # trained tokens of the global batch
    parts: Optional[LossParts] = None  # this rank's loss parts (not under pipeline parallelism)


def pack_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """labels and loss_mask as one [B, T, 2] tensor: the pipeline splits it into micro-batches with the inputs."""
    return torch.stack([batch["labels"], batch["loss_mask"].to(batch["labels"].dtype)], dim=-1)


@dataclass
class ParallelRuntime:
    """What a rank needs to run steps: the mesh, and the pipeline schedule when pp > 1."""

    dims: ParallelDims
    mesh: DeviceMesh
    model: torch.nn.Module  # this rank's (pruned, sharded) FLMTransformer
    schedule: Optional[object] = None
    has_first_stage: bool = True
    has_last_stage: bool = True
    loss_parallel: bool = True
    tied_group: Optional[dist.ProcessGroup] = None  # first and last stage holding a tied embedding
    _loss_scale: float = field(default=1.0, repr=False)

    @property
    def tied_copy(self) -> Optional[torch.nn.Parameter]:
        """The last stage's copy of a tied embedding (its gradient is already counted on the first stage)."""
        if self.tied_group is not None and self.has_last_stage and not self.has_first_stage:
            return self.model.tok_embeddings.weight
        return None

    def _sync_tied_embedding(self) -> None:
        """Sum the gradients of the two copies of a tied embedding: both then take the same update."""
        if self.tied_group is None:
            return
        grad = self.model.tok_embeddings.weight.grad
        if grad is not None:
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group)

    # ---- collectives --------------------------------------------------------------------------
    def _all_reduce(self, value: torch.Tensor, dim: str) -> torch.Tensor:
        if self.mesh[dim].size() > 1:
            dist.all_reduce(value, group=self.mesh[dim].get_group())
        return value

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """Broadcast a value computed on the last pipeline stage to every stage."""
        if self.dims.pp > 1:
            group = self.mesh["pp"].get_group()
            dist.broadcast(value, src=dist.get_global_rank(group, self.dims.pp - 1), group=group)
        return value

    def _loss_context(self):
        return loss_parallel() if self.loss_parallel and self.dims.tp > 1 else contextlib.nullcontext()

    # ---- steps ------------------------------------------------------------------------------
    def global_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._all_reduce(batch["loss_mask"].sum().to(torch.float32), "dp")

    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one micro-batch on the last stage: its token-loss sum times the step's scale."""
        ce = token_cross_entropy(logits, targets[..., 0])
        return (ce * targets[..., 1].to(ce.dtype)).sum() * self._loss_scale

    def _run_pipeline(self, batch: dict[str, torch.Tensor], train: bool) -> torch.Tensor:
        if batch.get("attention_mask") is not None or batch.get("position_ids") is not None:
            raise ConfigError("pipeline parallelism does not support document-boundary masks or position ids yet; "
                              "turn off the data's document resets or use pipeline_parallel_size: 1")
        losses: list[torch.Tensor] = []
        kwargs = dict(target=pack_targets(batch), losses=losses) if self.has_last_stage else {}
        args = (batch["input_ids"],) if self.has_first_stage else ()
        run = self.schedule.step if train else self.schedule.eval
        with self._loss_context():
            run(*args, **kwargs)
        total = torch.stack(losses).sum().detach() if self.has_last_stage else torch.zeros((), dtype=torch.float32)
        return self._from_last_stage(total.to(torch.float32))

    def _loss_parts(self, batch: dict[str, torch.Tensor]) -> LossParts:
        logits = self.model(batch["input_ids"], position_ids=batch.get("position_ids"),
                            attention_mask=batch.get("attention_mask"))
        return freelm_loss(logits, batch)

    def train_step(self, batch: dict[str, torch.Tensor], backward: Callable[[torch.Tensor], None]) -> StepResult:
        """Forward and backward of one global batch; gradients are left in the parameters."""
        tokens = self.global_tokens(batch)
        scale = self.dims.dp / tokens.clamp(min=1)
        if self.schedule is not None:
            self._loss_scale = float(scale)
            local = self._run_pipeline(batch, train=True)  # sum of micro-batch losses, already scaled
            self._sync_tied_embedding()
            return StepResult(loss=self._all_reduce(local, "dp") / self.dims.dp, tokens=tokens)
        with self._loss_context():
            parts = self._loss_parts(batch)
            loss_sum = parts.loss * parts.tokens
            backward(loss_sum * scale)
        return StepResult(loss=self._all_reduce(loss_sum.detach(), "dp") / tokens.clamp(min=1), tokens=tokens,
                          parts=parts)

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[LossParts]]:
        """(this rank's token-loss sum, its trained tokens, loss parts or None under pp)."""
        tokens = batch["loss_mask"].sum().to(torch.float32)
        if self.schedule is not None:
            self._loss_scale = 1.0
            return self._run_pipeline(batch, train=False), tokens, None
        with self._loss_context():
            parts = self._loss_parts(batch)
        return parts.loss * parts.tokens, tokens, parts

    def grad_norm(self, parameters) -> torch.Tensor:
        """Global L2 norm of the gradients over every shard and pipeline stage."""
        skip = self.tied_copy
        grads = [p.grad for p in parameters if p.grad is not None and p is not skip]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
        else:
            norm = torch.zeros(())
        squared = norm.to(torch.float32) ** 2
        return self._all_reduce(squared, "pp").sqrt() if self.dims.pp > 1 else squared.sqrt()
