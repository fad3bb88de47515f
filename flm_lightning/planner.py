"""Capacity planner: per-GPU memory, step FLOPs and time of a run and of a growth schedule.

Memory follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), adapted to this trainer's layers and to flash/SDPA attention, with
sequence parallelism assumed whenever tp > 1 (so every activation is split by tp):

- model state per parameter: fp32 weights 4 + grads 4 + AdamW 8 = 16 bytes; bf16 training
  keeps a bf16 compute copy (2), fp32 grads (4) and an fp32 master + AdamW (12), i.e. 18 bytes
  (DDP), 6 + 12/dp (distributed optimizer, ZeRO-1), or (4 + 4 + 8)/dp plus gathered layers (FSDP);
- activations per token and layer, in elements: attention 2h + 5 d_attn (norm in/out, q, k, v,
  attention output, output-projection input), MLP 2h + 4f (SwiGLU) or 2h + 2f (GeLU), plus
  heads x seq for the attention probabilities when attention is not flash (and not
  selectively recomputed); full recompute keeps only the layer input h;
- logits on the last stage: vocab/tp x (bf16 logits 2 + fp32 copy 4 + fp32 log-softmax 4) bytes;
- pipeline: the first stage holds min(pp, micro-batches) micro-batches in flight under 1F1B
  (all of them under GPipe; x(1 + (pp-1)/(pp v)) under interleaved1f1b, v = stages_per_rank).

Time: model FLOPs (`count_model`: 6N + attention) / (GPUs x achieved FLOP/s). The achieved rate
is either given (a measured TFLOP/s, as the FLM-101B card reports) or peak x MFU, reduced by the
pipeline bubble (pp-1)/(m v + pp-1) and by 3/4 under full recompute (an extra forward).

A layout is checked by the strategy's own `check_layout` (`flm_lightning.parallel.dims`), with its names
and messages: the same layout is refused here and by `main.py fit` for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig, ModelSize, count_model
from flm_lightning.parallel.dims import ParallelDims, check_layout, micro_batches_per_step

GIB = 1024**3
RECOMPUTE = ("none", "selective", "full")
SHARDING = ("ddp", "distributed-optimizer", "fsdp")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Layout:
    """A run's layout. tp, pp, dp, schedule and stages_per_rank are the strategy's tensor_parallel_size,
    pipeline_parallel_size, data_parallel_size, schedule and stages_per_rank; micro_batch is data.batch_size."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch: int = 1
    recompute: str = "none"
    sharding: str = "distributed-optimizer"
    schedule: str = "1f1b"
    stages_per_rank: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(pp=self.pp, dp=self.dp, tp=self.tp)

    def describe(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp} mb{self.micro_batch} {self.recompute} {self.sharding}"


@dataclass(frozen=True)
class Workload:
    global_batch: int  # sequences per optimizer step
    seq_len: int
    tokens: float = 0.0  # tokens to train on (0: no time estimate)
    precision: str = "bf16"
    flash: bool = True


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float = 80.0
    peak_tflops: float = 312.0
    mfu: float = 0.5
    achieved_tflops: Optional[float] = None  # measured model TFLOP/s per GPU; overrides peak x MFU
    overhead_gb: float = 3.0  # CUDA context, communication buffers, fragmentation
    gpu_hour_cost: Optional[float] = None


@dataclass
class Memory:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def gib(self) -> dict[str, float]:
        values = {k: v / GIB for k, v in asdict(self).items()}
        values["total"] = self.total / GIB
        return values


@dataclass
class RunPlan:
    layout: Layout
    memory: Memory
    fits: bool
    micro_batches: int
    bubble: float
    flops_per_token: int
    flops_per_step: float
    steps: int
    tflops_per_gpu: float
    seconds: float
    cost: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def days(self) -> float:
        return self.seconds / 86400

    def to_dict(self) -> dict:
        return {
            "layout": asdict(self.layout),
            "memory_gib": self.memory.gib(),
            "fits": self.fits,
            "micro_batches": self.micro_batches,
            "pipeline_bubble": self.bubble,
            "flops_per_token": self.flops_per_token,
            "flops_per_step": self.flops_per_step,
            "steps": self.steps,
            "tflops_per_gpu": self.tflops_per_gpu,
            "days": self.days,
            "cost": self.cost,
            "notes": self.notes,
        }


def check_plan(arch: ModelConfig, layout: Layout, workload: Workload, gpus: Optional[int] = None) -> int:
    """Raise ConfigError with what to change when the layout cannot run this model: the strategy's checks
    (`flm_lightning.parallel.dims.check_layout`, its messages) and the planner's own inputs. Returns the
    micro-batches per step and data-parallel rank."""
    if layout.recompute not in RECOMPUTE:
        raise ConfigError(f"recompute must be one of {list(RECOMPUTE)}, got {layout.recompute!r}")
    if layout.sharding not in SHARDING:
        raise ConfigError(f"sharding must be one of {list(SHARDING)}, got {layout.sharding!r}")
    if workload.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {workload.precision!r}")
    if not isinstance(layout.micro_batch, int) or layout.micro_batch < 1:
        raise ConfigError(f"data.batch_size (the micro-batch) must be a positive integer, got {layout.micro_batch!r}")
    dims = layout.dims
    if gpus is not None and dims.world_size != gpus:
        raise ConfigError(f"tp x pp x dp = {dims.world_size} does not equal --gpus {gpus}")
    micro_batches = micro_batches_per_step(workload.global_batch, layout.micro_batch, dims.dp)
    check_layout(
        dims,
        arch,
        seq_len=workload.seq_len,
        micro_batches=micro_batches,
        schedule=layout.schedule,
        stages_per_rank=layout.stages_per_rank,
    )
    return micro_batches


def _layer_parameters(arch: ModelConfig) -> int:
    d, a, f = arch.hidden_size, arch.attention_dim, arch.ffn_size
    mlp_mats = 3 if arch.activation == "swiglu" else 2
    weights = 4 * d * a + mlp_mats * d * f
    biases = (3 * a + d + (mlp_mats - 1) * f + d) if arch.bias else 0
    norms = 2 * d * (2 if arch.norm == "layernorm" and arch.bias else 1)
    return weights + biases + norms


def _activation_elements_per_token(arch: ModelConfig, layout: Layout, workload: Workload) -> float:
    """Saved activation elements per token of one layer, on one tensor-parallel rank."""
    d, a, f = arch.hidden_size, arch.attention_dim, arch.ffn_size
    if layout.recompute == "full":
        return d / layout.tp
    attention = 2 * d + 5 * a
    mlp = 2 * d + (4 * f if arch.activation == "swiglu" else 2 * f)
    scores = 0 if (workload.flash or layout.recompute == "selective") else arch.n_heads * workload.seq_len
    return (attention + mlp + scores) / layout.tp


def memory_per_gpu(
    arch: ModelConfig, layout: Layout, workload: Workload, hardware: Hardware, size: Optional[ModelSize] = None
) -> Memory:
    """Memory of the most loaded GPU: the first pipeline stage or the last, whichever is larger."""
    size = size or count_model(arch, workload.seq_len)
    layers_per_stage = math.ceil(arch.n_layers / layout.pp)
    layer_params = _layer_parameters(arch)
    embedding = size.embedding_parameters
    final_norm = arch.hidden_size * (2 if arch.norm == "layernorm" and arch.bias else 1)
    # A tied head shares the embedding on one stage; across stages the last keeps a copy (Megatron).
    head = 0 if arch.tie_embeddings and layout.pp == 1 else embedding
    if layout.pp == 1:
        first_params = (embedding + arch.n_layers * layer_params + final_norm + head) / layout.tp
    else:
        first_params = (embedding + layers_per_stage * layer_params) / layout.tp
    last_params = (layers_per_stage * layer_params + final_norm + head) / layout.tp

    bf16 = workload.precision == "bf16"
    act_bytes = 2 if bf16 else 4
    micro_batches = workload.global_batch // (layout.dp * layout.micro_batch)
    tokens_per_micro = layout.micro_batch * workload.seq_len
    if layout.schedule == "gpipe":
        in_flight = micro_batches
    else:
        in_flight = min(layout.pp, micro_batches)
        if layout.schedule == "interleaved1f1b" and layout.pp > 1:
            in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.stages_per_rank)
    per_layer = _activation_elements_per_token(arch, layout, workload) * tokens_per_micro * act_bytes
    if layout.recompute == "full":  # one layer is rebuilt in full during its backward
        one_layer = _activation_elements_per_token(arch, replace(layout, recompute="none"), workload)
        recompute_buffer = one_layer * tokens_per_micro * act_bytes
    else:
        recompute_buffer = 0.0
    first_acts = per_layer * layers_per_stage * in_flight + recompute_buffer
    last_acts = per_layer * layers_per_stage + recompute_buffer
    logit_bytes = (2 + 4 + 4) if bf16 else (4 + 4)
    logits = (
        tokens_per_micro * (arch.padded_vocab_size / layout.tp) * logit_bytes
        + 2 * tokens_per_micro * arch.hidden_size * act_bytes
    )

    def state(params: float) -> tuple[float, float, float]:
        if not bf16:  # fp32 weights and grads, AdamW moments
            shard = layout.dp if layout.sharding == "fsdp" else 1
            opt_shard = layout.dp if layout.sharding != "ddp" else 1
            return 4 * params / shard, 4 * params / shard, 8 * params / opt_shard
        if layout.sharding == "ddp":
            return 2 * params, 4 * params, 12 * params
        if layout.sharding == "distributed-optimizer":
            return 2 * params, 4 * params, 12 * params / layout.dp
        gathered = 2 * layer_params / layout.tp * 2 + 4 * layer_params / layout.tp  # 2 bf16 layers + 1 fp32 grad
        return 4 * params / layout.dp + gathered, 4 * params / layout.dp, 8 * params / layout.dp

    overhead = hardware.overhead_gb * GIB
    first = Memory(*state(first_params), first_acts, logits if layout.pp == 1 else 0.0, overhead)
    if layout.pp == 1:
        return first
    last = Memory(*state(last_params), last_acts, logits, overhead)
    return first if first.total >= last.total else last


def plan_run(
    arch: ModelConfig, layout: Layout, workload: Workload, hardware: Hardware, size: Optional[ModelSize] = None
) -> RunPlan:
    micro_batches = check_plan(arch, layout, workload)
    size = size or count_model(arch, workload.seq_len)
    memory = memory_per_gpu(arch, layout, workload, hardware, size)
    bubble = (layout.pp - 1) / (micro_batches * layout.stages_per_rank + layout.pp - 1) if layout.pp > 1 else 0.0
    notes = []
    if hardware.achieved_tflops:
        tflops = hardware.achieved_tflops
        notes.append(f"measured {tflops} TFLOP/s per GPU")
    else:
        tflops = hardware.peak_tflops * hardware.mfu * (1 - bubble) * (0.75 if layout.recompute == "full" else 1.0)
        notes.append(
            f"peak {hardware.peak_tflops} x MFU {hardware.mfu} x (1 - bubble {bubble:.3f})"
            + (" x 3/4 (full recompute)" if layout.recompute == "full" else "")
        )
    tokens_per_step = workload.global_batch * workload.seq_len
    flops_per_step = float(size.flops_per_token) * tokens_per_step
    steps = math.ceil(workload.tokens / tokens_per_step) if workload.tokens else 0
    seconds = steps * flops_per_step / (layout.gpus * tflops * 1e12)
    cost = layout.gpus * seconds / 3600 * hardware.gpu_hour_cost if hardware.gpu_hour_cost else None
    return RunPlan(
        layout=layout,
        memory=memory,
        fits=memory.total <= hardware.gpu_memory_gb * GIB,
        micro_batches=micro_batches,
        bubble=bubble,
        flops_per_token=size.flops_per_token,
        flops_per_step=flops_per_step,
        steps=steps,
        tflops_per_gpu=tflops,
        seconds=seconds,
        cost=cost,
        notes=notes,
    )


def candidate_layouts(arch: ModelConfig, gpus: int, workload: Workload, fixed: dict) -> list[Layout]:
    """Every valid layout for `gpus` (tp within a node: 1-8, powers of two), honouring fixed choices."""
    layouts = []
    for tp in (1, 2, 4, 8):
        for pp in [p for p in range(1, min(arch.n_layers, gpus) + 1) if gpus % (tp * p) == 0]:
            for mb in (1, 2, 4, 8):
                # With flash attention selective recompute saves nothing more: skip the duplicate.
                for recompute in ("none", "full") if workload.flash else RECOMPUTE:
                    layout = Layout(
                        tp=tp,
                        pp=pp,
                        dp=gpus // (tp * pp),
                        micro_batch=mb,
                        recompute=recompute,
                        sharding=fixed.get("sharding", "distributed-optimizer"),
                        schedule=fixed.get("schedule", "1f1b"),
                        stages_per_rank=fixed.get("stages_per_rank", 1),
                    )
                    if any(getattr(layout, k) != v for k, v in fixed.items()):
                        continue
                    try:
                        check_plan(arch, layout, workload, gpus)
                    except ConfigError:
                        continue
                    layouts.append(layout)
    return layouts


def rank_layouts(arch: ModelConfig, gpus: int, workload: Workload, hardware: Hardware, fixed: dict) -> list[RunPlan]:
    """Layouts that fit, fastest first; among equals fewer model-parallel ranks, then less memory.

    Tensor-parallel communication is not modelled, so a tie prefers the smaller tp and pp.
    """
    size = count_model(arch, workload.seq_len)
    plans = [
        plan_run(arch, layout, workload, hardware, size) for layout in candidate_layouts(arch, gpus, workload, fixed)
    ]
    fitting = [p for p in plans if p.fits]
    return sorted(fitting, key=lambda p: (round(p.seconds, 3), p.layout.tp, p.layout.pp, p.memory.total))


@dataclass
class Stage:
    name: str
    arch: ModelConfig
    tokens: float
    layout: Layout
    workload: Workload
    hardware: Hardware


def plan_schedule(stages: list[Stage]) -> dict:
    """Each stage's plan, the totals, and the final model trained from scratch on all the tokens.

    The from-scratch run uses the last stage's layout, batch and hardware.
    """
    if not stages:
        raise ConfigError("a growth schedule needs at least one stage")
    plans = [plan_run(s.arch, s.layout, s.workload, s.hardware) for s in stages]
    total_tokens = sum(s.tokens for s in stages)
    last = stages[-1]
    scratch = plan_run(last.arch, last.layout, replace(last.workload, tokens=total_tokens), last.hardware)
    stage_flops = [p.flops_per_step * p.steps for p in plans]
    scratch_flops = scratch.flops_per_step * scratch.steps
    gpu_hours = sum(p.seconds * p.layout.gpus for p in plans) / 3600
    return {
        "stages": [
            {
                "name": s.name,
                "parameters": count_model(s.arch).parameters,
                "tokens": s.tokens,
                "flops": f,
                **p.to_dict(),
            }
            for s, p, f in zip(stages, plans, stage_flops)
        ],
        "total": {
            "tokens": total_tokens,
            "flops": sum(stage_flops),
            "days": sum(p.days for p in plans),
            "gpu_hours": gpu_hours,
            "cost": sum(p.cost for p in plans) if all(p.cost is not None for p in plans) else None,
        },
        "from_scratch": {"flops": scratch_flops, "days": scratch.days, "cost": scratch.cost},
        "flops_ratio": sum(stage_flops) / scratch_flops,
        "time_ratio": sum(p.days for p in plans) / scratch.days if scratch.days else None,
    }
