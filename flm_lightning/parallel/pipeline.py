"""Pipeline parallelism: split the decoder into stages by layer and run a `torch.distributed.pipelining`
schedule over them.

Each rank keeps ONE pruned `FLMTransformer` (`prune_model`) that holds the layers of all its
stages under their original names, so parameter names, state dicts and checkpoints are the same
as the unsplit model's whatever the layout. The schedule runs thin `StageModule`s that share
those very modules.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from flm_lightning.model import FLMTransformer
from flm_lightning.parallel.dims import stage_layers


def rank_stages(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Stage ids run by `pp_rank`: looped placement (rank r runs r, r + pp, ...), as Interleaved1F1B expects."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


# On which stages each submodule of `FLMTransformer` runs: "first" / "last" (the first or last stage only),
# "every" (shared by all stages, e.g. the rotary tables) or "layers" (each stage its own layers).
STAGE_PLACEMENT = {"tok_embeddings": "first", "rotary": "every", "layers": "layers", "norm": "last", "output": "last"}


class StageModule(FLMTransformer):
    """One pipeline stage: a view over the pruned model's modules (no parameters of its own).

    It runs `FLMTransformer.forward` without `FLMTransformer.__init__` (which would build and draw a
    whole model): every submodule of `model` is placed by `STAGE_PLACEMENT`, and one missing from that
    table stops the split with a TypeError, so a submodule added to the model cannot silently be left
    out of (or run twice by) the stages.

    With tied embeddings the last stage computes the logits with its own copy of the embedding
    matrix (kept under the same name, `tok_embeddings.weight`, so checkpoints do not change);
    `ParallelRuntime` sums the two copies' gradients so they stay identical (Megatron's approach).
    """

    def __init__(self, model: FLMTransformer, layer_names: list[str], first: bool, last: bool):
        nn.Module.__init__(self)
        self.config = model.config
        runs_here = {"first": first, "last": last, "every": True, "layers": True}
        for name in STAGE_PLACEMENT:
            setattr(self, name, None)  # pruned from this rank's model, or not run by this stage
        for name, child in model.named_children():
            if name not in STAGE_PLACEMENT:
                raise TypeError(
                    f"FLMTransformer.{name} has no pipeline placement: add it to "
                    "flm_lightning.parallel.pipeline.STAGE_PLACEMENT"
                )
            if name == "layers":
                child = nn.ModuleDict({n: model.layers[n] for n in layer_names})
            setattr(self, name, child if runs_here[STAGE_PLACEMENT[name]] else None)
        self.is_last = last
        self.tied_head = model.tok_embeddings if last and model.config.tie_embeddings else None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if not self.is_last:
            return h  # hidden states go to the next stage
        if self.tied_head is None:
            return super().logits(h)
        scale = self.config.logit_scale
        logits = F.linear(h, self.tied_head.weight)
        return logits * scale if scale != 1.0 else logits


def prune_model(model: FLMTransformer, stage_ids: list[int], layer_names: list[list[str]]) -> None:
    """Drop from `model` (in place) every layer, embedding and head that none of `stage_ids` runs."""
    last = len(layer_names) - 1
    keep = {name for s in stage_ids for name in layer_names[s]}
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    tied_head_here = model.config.tie_embeddings and last in stage_ids
    if 0 not in stage_ids and not tied_head_here:
        model.tok_embeddings = None
    if last not in stage_ids:
        model.norm, model.output = None, None


def split_for_rank(
    model: FLMTransformer, pp_rank: int, pp: int, stages_per_rank: int = 1, layout: Optional[list[int]] = None
) -> tuple[list[int], list[StageModule]]:
    """Prune `model` to this rank's stages and return (stage ids, stage modules)."""
    n_stages = pp * stages_per_rank
    names = stage_layers(model.config.n_layers, n_stages, layout)
    ids = rank_stages(pp_rank, pp, stages_per_rank)
    prune_model(model, ids, names)
    stages = [StageModule(model, names[s], first=s == 0, last=s == n_stages - 1) for s in ids]
    return ids, stages


def build_schedule(
    stages: list[StageModule],
    stage_ids: list[int],
    n_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    micro_batches: int,
    loss_fn: Optional[Callable],
) -> object:
    """A torch.distributed.pipelining schedule over this rank's stages (None loss_fn: forward only)."""
    group = pp_mesh.get_group()
    pipeline_stages = [PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(stages, stage_ids)]
    # scale_grads=False: the loss function already normalises by the global batch's token count.
    kwargs = dict(n_microbatches=micro_batches, loss_fn=loss_fn, scale_grads=False)
    if schedule == "interleaved1f1b":
        return ScheduleInterleaved1F1B(pipeline_stages, **kwargs)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    return cls(pipeline_stages[0], **kwargs)


def tied_embedding_group(mesh: DeviceMesh) -> Optional[dist.ProcessGroup]:
    """The group of this rank's first- and last-stage peers (same dp and tp coordinates), who hold the
    two copies of a tied embedding; None on middle stages. Every rank must call this."""
    ranks = mesh.mesh  # [pp, dp, tp] global ranks
    pairs = [[int(ranks[0, d, t]), int(ranks[-1, d, t])] for d in range(ranks.shape[1]) for t in range(ranks.shape[2])]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group
