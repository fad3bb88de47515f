"""The FreeLM-unified objective (DESIGN.md section 3).

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
    loss: torch.Tensor  # mean CE over all unmasked targets (what is optimised)
    tokens: torch.Tensor  # number of unmasked targets
    lm_loss_sum: torch.Tensor
    lm_tokens: torch.Tensor
    teacher_loss_sum: torch.Tensor
    teacher_tokens: torch.Tensor
    teacher_preds: Optional[torch.Tensor]  # argmax at teacher label positions
    teacher_targets: Optional[torch.Tensor]

    @property
    def lm_loss(self) -> torch.Tensor:
        return self.lm_loss_sum / self.lm_tokens.clamp(min=1)

    @property
    def teacher_loss(self) -> torch.Tensor:
        return self.teacher_loss_sum / self.teacher_tokens.clamp(min=1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, T] in fp32.

    Vocabulary-sharded logits (a DTensor, inside `loss_parallel()`) give a replicated result that
    is returned as a plain tensor, so masks and sums stay ordinary tensor code.
    """
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    if isinstance(ce, DTensor):
        ce = ce.to_local()
    return ce.view_as(labels)


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
    if bool(is_teacher.any()):
        sel = teacher_mask.bool()
        full = logits.detach().full_tensor() if isinstance(logits, DTensor) else logits.detach()
        preds = full[sel].argmax(dim=-1)
        targets = labels[sel]
    return LossParts(
        loss=ce.sum() / tokens.clamp(min=1),
        tokens=tokens,
        lm_loss_sum=(ce * (1 - teacher_rows)).sum(),
        lm_tokens=lm_mask.sum(),
        teacher_loss_sum=(ce * teacher_rows).sum(),
        teacher_tokens=teacher_mask.sum(),
        teacher_preds=preds,
        teacher_targets=targets,
    )
