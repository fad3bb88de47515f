"""The FreeLM-unified objective.

FLM-101B folded FreeLM's teacher signal into plain causal language modelling: a teacher
sample `<text> <proposition> <label token>` is scored on its label token only (the data
sets `loss_mask` to 1 there and 0 elsewhere), language samples on every token. The trained
loss is one masked cross-entropy over all unmasked targets of the batch; the language part,
the teacher part and the teacher accuracy are reported separately.

Batch contract (every data source produces it):
    input_ids  long  [B, T]
    labels     long  [B, T]   next-token targets
    loss_mask  float [B, T]   1 where the target is trained
    is_teacher bool  [B]      optional; True for teacher (label-token) samples
    position_ids long [B, T]  optional
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


@dataclass
class LossParts:
    """Sums of one (micro-)batch's token losses, split by kind; every mean derives from them.

    Sums, not means, so micro-batches and data-parallel ranks combine exactly: the loss of a step is
    the sum of its token losses over the trained tokens of the whole step (`StepStats`).
    """

    loss_sum: torch.Tensor  # sum of the CE of all trained targets (fp32 scalar, differentiable)
    tokens: torch.Tensor  # number of trained targets
    lm_loss_sum: torch.Tensor
    lm_tokens: torch.Tensor
    teacher_loss_sum: torch.Tensor
    teacher_tokens: torch.Tensor
    teacher_correct: torch.Tensor  # teacher label tokens predicted by argmax
    teacher_preds: Optional[torch.Tensor]  # argmax at teacher label positions
    teacher_targets: Optional[torch.Tensor]

    @property
    def loss(self) -> torch.Tensor:
        """Mean CE over the trained targets (what one batch alone would optimise)."""
        return self.loss_sum / self.tokens.clamp(min=1)

    @property
    def lm_loss(self) -> torch.Tensor:
        return self.lm_loss_sum / self.lm_tokens.clamp(min=1)

    @property
    def teacher_loss(self) -> torch.Tensor:
        return self.teacher_loss_sum / self.teacher_tokens.clamp(min=1)

    def sums(self) -> torch.Tensor:
        """The detached sums as one fp32 vector in `STAT_FIELDS` order (one collective reduces them all)."""
        values = [
            self.loss_sum,
            self.tokens,
            self.lm_loss_sum,
            self.lm_tokens,
            self.teacher_loss_sum,
            self.teacher_tokens,
            self.teacher_correct,
        ]
        return torch.stack([v.detach().to(torch.float32).reshape(()) for v in values])


STAT_FIELDS = (
    "loss_sum",
    "tokens",
    "lm_loss_sum",
    "lm_tokens",
    "teacher_loss_sum",
    "teacher_tokens",
    "teacher_correct",
)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, T] in fp32 (targets equal to -100 give 0, as in F.cross_entropy).

    fp32 logits go through `F.cross_entropy`. Lower-precision logits (bf16 under autocast) go
    through `LeanCrossEntropy`, which never materialises an fp32 copy of the [B*T, V] logits: the
    plain path would hold the fp32 copy and its fp32 log-softmax (8 bytes per logit) on top of the
    bf16 logits (2 bytes). A DTensor (vocabulary sharded by tensor parallelism, under
    `loss_parallel()`) takes the plain path, which is what loss_parallel implements; its
    replicated result comes back as a plain tensor, so masks and sums stay ordinary tensor code.
    """
    flat, targets = logits.flatten(0, 1), labels.flatten()
    if isinstance(logits, DTensor):
        return F.cross_entropy(flat.float(), targets, reduction="none").to_local().view_as(labels)
    if logits.dtype == torch.float32:
        return F.cross_entropy(flat, targets, reduction="none").view_as(labels)
    return LeanCrossEntropy.apply(flat, targets).view_as(labels)


IGNORE_INDEX = -100
# Logits per chunk of LeanCrossEntropy (its fp32 working set is 4 bytes each), by device type. On a
# CPU a chunk that stays in the L2 cache is about 2.3x cheaper than one 64 MiB chunk: forward and
# backward of [2048, 4096] bf16 logits took 32 ms of CPU time with chunks of 2**17 and 69 ms with
# 2**24, one thread (benchmarks/cross_entropy_speed.py; docs/performance.md). GPUs take large chunks
# (fewer kernel launches; the working set stays bounded).
LEAN_CE_CHUNK_ELEMENTS = {"cpu": 2**17}
LEAN_CE_CHUNK_ELEMENTS_OTHER = 2**24
LEAN_CE_MIN_ROWS = 8  # a huge vocabulary still gets a few rows per chunk (Python overhead per chunk)


def lean_chunk_rows(logits: torch.Tensor) -> int:
    """Token rows per LeanCrossEntropy chunk for `logits` [N, V] on its device."""
    elements = LEAN_CE_CHUNK_ELEMENTS.get(logits.device.type, LEAN_CE_CHUNK_ELEMENTS_OTHER)
    return max(LEAN_CE_MIN_ROWS, elements // logits.shape[-1])


class LeanCrossEntropy(torch.autograd.Function):
    """Cross-entropy over token chunks, upcast to fp32 one chunk at a time.

    Saves the logits (their own dtype) and one fp32 log-sum-exp per token; the backward pass
    rebuilds softmax - one_hot chunk by chunk and writes the gradient in the logits' dtype.
    Values and gradients equal `F.cross_entropy(logits.float(), ...)` up to that final cast.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        chunk = lean_chunk_rows(logits)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty_like(lse)
        safe_targets = targets.clamp(min=0)
        for start in range(0, n, chunk):
            part = logits[start : start + chunk].float()
            lse[start : start + chunk] = torch.logsumexp(part, dim=-1)
            target_logit[start : start + chunk] = part.gather(1, safe_targets[start : start + chunk, None])[:, 0]
        ignored = targets == IGNORE_INDEX
        ctx.save_for_backward(logits, safe_targets, lse, ignored)
        ctx.chunk = chunk
        return (lse - target_logit).masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, lse, ignored = ctx.saved_tensors
        grad_loss = grad_loss.float().masked_fill(ignored, 0.0)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = torch.exp(logits[rows].float() - lse[rows, None])
            probs.scatter_add_(1, targets[rows, None], torch.full_like(probs[:, :1], -1.0))
            grad[rows] = probs * grad_loss[rows, None]
        return grad, None


def freelm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossParts:
    labels = batch["labels"]
    mask = batch["loss_mask"].to(torch.float32)
    ce = token_cross_entropy(logits, labels) * mask
    is_teacher = batch.get("is_teacher")
    if is_teacher is None:
        is_teacher = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    teacher_rows = is_teacher[:, None].to(torch.float32)
    teacher_mask = mask * teacher_rows
    lm_mask = mask - teacher_mask
    tokens = mask.sum()
    preds = targets = None
    correct = torch.zeros((), device=labels.device)
    if bool(is_teacher.any()):
        sel = teacher_mask.bool()
        full = logits.detach().full_tensor() if isinstance(logits, DTensor) else logits.detach()
        preds = full[sel].argmax(dim=-1)
        targets = labels[sel]
        correct = (preds == targets).sum().to(torch.float32)
    return LossParts(
        loss_sum=ce.sum(),
        tokens=tokens,
        lm_loss_sum=(ce * (1 - teacher_rows)).sum(),
        lm_tokens=lm_mask.sum(),
        teacher_loss_sum=(ce * teacher_rows).sum(),
        teacher_tokens=teacher_mask.sum(),
        teacher_correct=correct,
        teacher_preds=preds,
        teacher_targets=targets,
    )
