"""Mesh sizes of a (pp, dp, tp) layout and every check that a layout fits a model, in one place.

All checks run before any process group exists, so a bad layout fails with one message on every
rank instead of hanging in a collective. The strategy (`FLMParallelStrategy.check`), the planner
(`flm_lightning.planner.check_plan`) and compare-layouts call the same `check_layout`, with the
strategy's names (`trainer.strategy.init_args`): `tensor_parallel_size`, `pipeline_parallel_size`,
`data_parallel_size`, `schedule` (gpipe, 1f1b, interleaved1f1b), `stages_per_rank`, `layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig

MESH_DIMS = ("pp", "dp", "tp")
SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b")


def _check_size(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"trainer.strategy.{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the pipeline, data and tensor parallel dimensions; dp * tp * pp == world size."""

    pp: int
    dp: int
    tp: int

    def __post_init__(self) -> None:
        for name, value in (
            ("pipeline_parallel_size", self.pp),
            ("data_parallel_size", self.dp),
            ("tensor_parallel_size", self.tp),
        ):
            _check_size(name, value)

    @classmethod
    def infer(cls, world_size: int, tp: int = 1, pp: int = 1, dp: Optional[int] = None) -> "ParallelDims":
        """The layout for `world_size` processes; dp defaults to what tp and pp leave."""
        for name, value in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp), ("data_parallel_size", dp)):
            if value is not None:
                _check_size(name, value)
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} (nodes x devices) is not divisible by tensor_parallel_size x "
                f"pipeline_parallel_size = {tp} x {pp}"
            )
        inferred = world_size // (tp * pp)
        if dp is not None and dp != inferred:
            raise ConfigError(
                f"trainer.strategy.data_parallel_size={dp} does not fit world size {world_size} with tp={tp}, "
                f"pp={pp} (dp must be {inferred}); leave it unset to infer it"
            )
        return cls(pp=pp, dp=inferred, tp=tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.pp, self.dp, self.tp

    def __str__(self) -> str:
        return f"pp{self.pp} x dp{self.dp} x tp{self.tp}"


def micro_batches_per_step(global_batch_size: Optional[int], batch_size: int, dp: int) -> int:
    """Micro-batches of `batch_size` samples that each of `dp` data-parallel ranks runs per optimizer step.

    This is gradient accumulation and, under pipeline parallelism, the schedule's micro-batches:
    one concept in every layout. `global_batch_size` None means one micro-batch per step.

    Raises:
        ConfigError: when `global_batch_size` is not a multiple of `batch_size x dp`.
    """
    if global_batch_size is None:
        return 1
    if global_batch_size % (batch_size * dp):
        raise ConfigError(
            f"data.global_batch_size={global_batch_size} is not a multiple of data.batch_size x data-parallel ranks "
            f"= {batch_size} x {dp}; each optimizer step must run a whole number of micro-batches on every rank"
        )
    return global_batch_size // (batch_size * dp)


def check_layout(
    dims: ParallelDims,
    arch: ModelConfig,
    *,
    seq_len: Optional[int] = None,
    micro_batches: int = 1,
    schedule: str = "1f1b",
    stages_per_rank: int = 1,
    layout: Optional[list[int]] = None,
) -> None:
    """Raise ConfigError naming the first setting that makes `dims` unusable for `arch`.

    `micro_batches` is per optimizer step and data-parallel rank (`micro_batches_per_step`)."""
    where = "trainer.strategy"
    if schedule not in SCHEDULES:
        raise ConfigError(f"{where}.schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    _check_size("stages_per_rank", stages_per_rank)
    if dims.tp > 1:
        heads = arch.attention_dim // arch.head_size
        for what, size in (
            ("model.arch.n_heads", heads),
            ("the ffn width", arch.ffn_size),
            ("the padded vocabulary", arch.padded_vocab_size),
        ):
            if size % dims.tp:
                raise ConfigError(f"{where}.tensor_parallel_size={dims.tp} does not divide {what} ({size})")
        if seq_len is not None and seq_len % dims.tp:
            raise ConfigError(
                f"{where}.tensor_parallel_size={dims.tp} does not divide the sequence length {seq_len} "
                "(sequence parallelism splits it)"
            )
    if dims.pp > 1:
        stages = dims.pp * stages_per_rank
        if stages > arch.n_layers:
            raise ConfigError(
                f"{where}: {stages} pipeline stages (pipeline_parallel_size={dims.pp} x stages_per_rank="
                f"{stages_per_rank}) but only {arch.n_layers} layers (model.arch.n_layers)"
            )
        if micro_batches < dims.pp:
            raise ConfigError(
                f"{micro_batches} micro-batch(es) per step (data.global_batch_size / (data.batch_size x dp)) is "
                f"fewer than pipeline_parallel_size={dims.pp}: the pipeline would idle; raise data.global_batch_size "
                "or lower data.batch_size"
            )
        if schedule == "interleaved1f1b" and stages_per_rank < 2:
            raise ConfigError(f"{where}: schedule interleaved1f1b needs stages_per_rank >= 2")
        if schedule != "interleaved1f1b" and stages_per_rank != 1:
            raise ConfigError(f"{where}: stages_per_rank > 1 needs schedule interleaved1f1b, got {schedule!r}")
        if layout is not None:
            if len(layout) != stages or sum(layout) != arch.n_layers or min(layout) < 1:
                raise ConfigError(
                    f"{where}.layout={layout} must list {stages} positive layer counts summing to "
                    f"model.arch.n_layers={arch.n_layers}"
                )


def stage_layers(n_layers: int, stages: int, layout: Optional[list[int]] = None) -> list[list[str]]:
    """Layer names of each pipeline stage: `layout` counts, or as even as possible (earlier stages get
    the remainder, since the last stage also carries the head and the loss)."""
    counts = layout or [n_layers // stages + (1 if s < n_layers % stages else 0) for s in range(stages)]
    names, start = [], 0
    for count in counts:
        names.append([str(i) for i in range(start, start + count)])
        start += count
    return names
