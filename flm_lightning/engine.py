"""The one training and evaluation step of the FreeLM objective, for every (pp, dp, tp) layout.

One optimizer step consumes this rank's share of the global batch, `micro_batches` micro-batches
of `data.batch_size` samples (gradient accumulation and pipeline micro-batches are the same
thing). The loss is normalised once, by the trained tokens of the whole step over every
micro-batch and every data-parallel rank (torchtitan's and Megatron's per-token loss):

    loss = sum of token losses of the step / trained tokens of the step

Each micro-batch back-propagates `its token-loss sum * dp / step tokens`; FSDP's average over dp
and the sum over micro-batches then leave the gradient of `loss` in the parameters, exactly as a
single forward over the whole global batch would. A teacher row (one trained label token) thus
weighs one token, whatever micro-batch or rank it lands in. Under pipeline parallelism the
schedule runs the micro-batches and its loss function applies the same scale (scale_grads=False).

The step's sums (loss, language and teacher parts, teacher accuracy) are reduced over data-parallel
ranks in one collective and returned on every rank, so what is logged is the step's value.
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
from flm_lightning.objective import STAT_FIELDS, LossParts, freelm_loss
from flm_lightning.parallel.dims import ParallelDims

SINGLE = ParallelDims(pp=1, dp=1, tp=1)


@dataclass
class StepStats:
    """Sums over a whole step (all micro-batches, all data-parallel ranks), `STAT_FIELDS` order."""

    sums: torch.Tensor  # fp32 [len(STAT_FIELDS)]

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in STAT_FIELDS:
            return self.sums[STAT_FIELDS.index(name)]
        raise AttributeError(name)

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return num / den.clamp(min=1)

    @property
    def loss(self) -> torch.Tensor:
        """Token-weighted mean loss of the step (what the update optimises)."""
        return self._ratio(self.loss_sum, self.tokens)

    @property
    def lm_loss(self) -> torch.Tensor:
        return self._ratio(self.lm_loss_sum, self.lm_tokens)

    @property
    def teacher_loss(self) -> torch.Tensor:
        return self._ratio(self.teacher_loss_sum, self.teacher_tokens)

    @property
    def teacher_acc(self) -> torch.Tensor:
        return self._ratio(self.teacher_correct, self.teacher_tokens)

    def train_metrics(self, grad_norm: Optional[torch.Tensor] = None) -> dict[str, float]:
        """`train/loss`, `train/ppl` and, when the step has such tokens, `train/lm_loss`, `train/teacher_loss`,
        `train/teacher_acc` (nats, fraction); `train/grad_norm` when given. A value the step does not have
        is left out rather than repeated from an earlier step."""
        metrics = {"train/loss": self.loss, "train/ppl": torch.exp(self.loss)}
        if self.lm_tokens > 0:
            metrics["train/lm_loss"] = self.lm_loss
        if self.teacher_tokens > 0:
            metrics["train/teacher_loss"] = self.teacher_loss
            metrics["train/teacher_acc"] = self.teacher_acc
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        return {k: float(v) for k, v in metrics.items()}


def split_micro_batches(batch: dict[str, torch.Tensor], micro_batches: int) -> list[dict[str, torch.Tensor]]:
    """`batch` (every tensor [B, ...]) as `micro_batches` consecutive slices of B / micro_batches rows.

    Raises:
        ConfigError: when B is not a multiple of `micro_batches`.
    """
    rows = batch["input_ids"].shape[0]
    if micro_batches == 1:
        return [batch]
    if rows % micro_batches:
        raise ConfigError(f"a batch of {rows} samples does not split into {micro_batches} equal micro-batches")
    size = rows // micro_batches
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(micro_batches)]


def pack_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """labels, loss_mask and the teacher-row flag as one [B, T, 3] tensor: the pipeline splits it into
    micro-batches together with the inputs."""
    labels = batch["labels"]
    teacher = batch.get("is_teacher")
    teacher = torch.zeros(labels.shape[0], dtype=labels.dtype, device=labels.device) if teacher is None else teacher
    return torch.stack(
        [labels, batch["loss_mask"].to(labels.dtype), teacher.to(labels.dtype)[:, None].expand_as(labels)], dim=-1
    )


@dataclass
class StepEngine:
    """What a rank needs to run steps: the layout, the mesh (None in one process), this rank's model,
    the micro-batches per step and, when pp > 1, the pipeline schedule (which holds them)."""

    model: torch.nn.Module  # this rank's (possibly pruned, sharded) FLMTransformer
    micro_batches: int = 1
    dims: ParallelDims = SINGLE
    mesh: Optional[DeviceMesh] = None
    schedule: Optional[object] = None
    has_first_stage: bool = True
    has_last_stage: bool = True
    loss_parallel: bool = True
    tied_group: Optional[dist.ProcessGroup] = None  # first and last stage holding a tied embedding
    grad_norm_of_step: Optional[torch.Tensor] = field(default=None, repr=False)  # set by step_grad_norm
    _loss_scale: float = field(default=1.0, repr=False)
    _stage_sums: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def tied_copy(self) -> Optional[torch.nn.Parameter]:
        """The last stage's copy of a tied embedding (its gradient is already counted on the first stage)."""
        if self.tied_group is not None and self.has_last_stage and not self.has_first_stage:
            return self.model.tok_embeddings.weight
        return None

    @property
    def tp_rank(self) -> int:
        return self.mesh["tp"].get_local_rank() if self.mesh is not None else 0

    def _sync_tied_embedding(self) -> None:
        """Sum the gradients of the two copies of a tied embedding: both then take the same update."""
        if self.tied_group is None:
            return
        grad = self.model.tok_embeddings.weight.grad
        if grad is not None:
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group)

    # ---- collectives --------------------------------------------------------------------------
    def _all_reduce(self, value: torch.Tensor, dim: str) -> torch.Tensor:
        if self.mesh is not None and self.mesh[dim].size() > 1:
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

    def _zeros(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(STAT_FIELDS), dtype=torch.float32, device=like.device)

    # ---- pipeline -----------------------------------------------------------------------------
    def pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of one micro-batch on the last stage: its token-loss sum times the step's scale; its
        sums are kept for the step's."""
        micro = {"labels": targets[..., 0], "loss_mask": targets[..., 1], "is_teacher": targets[:, 0, 2].bool()}
        parts = freelm_loss(logits, micro)
        self._stage_sums.append(parts.sums())
        return parts.loss_sum * self._loss_scale

    def _run_pipeline(self, batch: dict[str, torch.Tensor], train: bool) -> torch.Tensor:
        if batch.get("attention_mask") is not None or batch.get("position_ids") is not None:
            raise ConfigError(
                "pipeline parallelism does not support document-boundary masks or position ids yet; "
                "turn off the data's document resets or use pipeline_parallel_size: 1"
            )
        self._stage_sums = []
        kwargs = dict(target=pack_targets(batch), losses=[]) if self.has_last_stage else {}
        args = (batch["input_ids"],) if self.has_first_stage else ()
        run = self.schedule.step if train else self.schedule.eval
        with self._loss_context():
            run(*args, **kwargs)
        # The schedule's first step also calls the loss once to infer gradient shapes: the step's
        # micro-batches are the last `micro_batches` calls.
        calls, self._stage_sums = self._stage_sums[-self.micro_batches :], []
        sums = torch.stack(calls).sum(dim=0) if self.has_last_stage else self._zeros(batch["input_ids"])
        return self._from_last_stage(sums)

    # ---- steps ----------------------------------------------------------------------------------
    def loss_parts(self, batch: dict[str, torch.Tensor]) -> LossParts:
        logits = self.model(
            batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask")
        )
        return freelm_loss(logits, batch)

    def train_step(self, batch: dict[str, torch.Tensor], backward: Callable[[torch.Tensor], None]) -> StepStats:
        """Forward and backward of this rank's share of one optimizer step (all its micro-batches);
        the gradient of the step's per-token loss is left in the parameters."""
        self.grad_norm_of_step = None
        tokens = self._all_reduce(batch["loss_mask"].sum().to(torch.float32), "dp")
        scale = self.dims.dp / tokens.clamp(min=1)
        if self.schedule is not None:
            self._loss_scale = float(scale)
            sums = self._run_pipeline(batch, train=True)  # the schedule runs every micro-batch
            self._sync_tied_embedding()
        else:
            sums = self._zeros(batch["input_ids"])
            for micro in split_micro_batches(batch, self.micro_batches):
                with self._loss_context():
                    parts = self.loss_parts(micro)
                    backward(parts.loss_sum * scale)
                sums += parts.sums()
        return StepStats(self._all_reduce(sums, "dp"))

    @torch.no_grad()
    def eval_step(self, batch: dict[str, torch.Tensor]) -> StepStats:
        """This rank's sums over `batch` (not reduced over ranks: validation metrics sync at epoch end)."""
        if self.schedule is not None:
            return StepStats(self._run_pipeline(batch, train=False))
        sums = self._zeros(batch["input_ids"])
        for micro in split_micro_batches(batch, self.micro_batches if self._splits(batch) else 1):
            with self._loss_context():
                sums += self.loss_parts(micro).sums()
        return StepStats(sums)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """This rank's per-token loss of `batch` (nats) with dropout off (the same on every pipeline stage)."""
        training = self.model.training
        self.model.eval()
        try:
            return float(self.eval_step(batch).loss)
        finally:
            self.model.train(training)

    def _splits(self, batch: dict[str, torch.Tensor]) -> bool:
        return batch["input_ids"].shape[0] % self.micro_batches == 0

    def step_grad_norm(self, parameters: list[torch.nn.Parameter]) -> Optional[torch.Tensor]:
        """`grad_norm` of this step, computed once per step (`grad_norm_of_step`); None without any gradient."""
        if self.grad_norm_of_step is None and any(p.grad is not None for p in parameters):
            self.grad_norm_of_step = self.grad_norm(parameters)
        return self.grad_norm_of_step

    def clip_gradients(self, parameters: list[torch.nn.Parameter], max_norm: Optional[float]) -> None:
        """Compute this step's gradient norm and, with `max_norm`, scale the gradients to at most that norm (the
        norm before clipping is the one logged, what a spike detector wants). No gradient: nothing to do (e.g.
        the guard dropped this update)."""
        norm = self.step_grad_norm(parameters)
        if norm is not None and max_norm:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)

    def grad_norm(self, parameters) -> torch.Tensor:
        """Global L2 norm of the gradients over every shard and pipeline stage (fp32 scalar)."""
        skip = self.tied_copy
        parameters = list(parameters)
        grads = [p.grad for p in parameters if p.grad is not None and p is not skip]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
        else:  # on the parameters' device: NCCL reduces CUDA tensors only
            device = parameters[0].device if parameters else None
            norm = torch.zeros((), device=device)
        squared = norm.to(torch.float32) ** 2
        return self._all_reduce(squared, "pp").sqrt() if self.dims.pp > 1 else squared.sqrt()
