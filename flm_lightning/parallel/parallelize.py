"""Tensor + sequence parallelism and FSDP2, applied to a plain `FLMTransformer` from outside.

Order (torchtitan's): tensor parallel -> activation checkpointing -> compile -> FSDP. The
plans address modules by the stable names of `flm_lightning.model.layers`; a pipeline stage
whose embedding, norm or head is None simply skips those entries.

Sequence parallel layout: between blocks the residual stream is split along the sequence
(Shard(1)); norms run on their shard; each attention / MLP gathers the full sequence, runs
column-parallel in projections and reduce-scatters after the row-parallel out projection.
The head is column-parallel over the vocabulary and its logits stay sharded (Shard(-1)) for the
vocabulary-parallel cross-entropy (`torch.distributed.tensor.parallel.loss_parallel`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from flm_lightning.model import FLMTransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def block_plan() -> dict:
    """Plan of one TransformerBlock: heads and FFN columns split over tp, sequence-parallel norms."""
    gather = dict(desired_input_layouts=(Replicate(),), use_local_output=True)
    return {
        "attention_norm": SequenceParallel(),
        # Only x is a tensor to lay out; the rotary tables, mask and cache pass through untouched.
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), **gather),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def apply_tensor_parallel(model: FLMTransformer, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a whole model or a pipeline stage) over `tp_mesh` with sequence parallelism."""
    top: dict = {}
    if model.tok_embeddings is not None:
        # Vocabulary-parallel embedding; its output leaves already split along the sequence.
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan())
    if model.config.tie_embeddings and model.tok_embeddings is not None and model.norm is not None:
        # Tied head: F.linear(h, embedding weight) with h the norm's sequence-sharded DTensor; gather
        # the sequence so the product comes out vocabulary-sharded like an untied head's.
        model.norm.register_forward_hook(lambda _m, _i, out: out.redistribute(placements=[Replicate()]))


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: str = "float32",
    reduce_dtype: str = "float32",
    reshard_after_forward: bool = True,
    roots: list[nn.Module] | None = None,
) -> None:
    """FSDP2 on the dp mesh: each block is one unit, then the remaining parameters (embedding, norm,
    head) in one unit per root (the model, or each pipeline stage)."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    blocks = [b for m in (roots or [model]) for b in m.layers.values()]
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for root in roots or [model]:
        fully_shard(root, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
