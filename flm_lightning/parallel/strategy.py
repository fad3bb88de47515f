"""`FLMParallelStrategy`: Lightning's ModelParallelStrategy with a (pp, dp, tp) mesh.

The strategy owns the layout (sizes from YAML, checked before any collective), builds the
mesh, parallelises the module's plain model (`parallelize`) when the module's `configure_model`
asks for it, and checkpoints with torch.distributed.checkpoint under layout-independent names,
so a run saved at one layout resumes at another.

Training under it runs the module's one step (`flm_lightning.engine`): the micro-batches of a step
are `data.global_batch_size / (data.batch_size x dp)`, the pipeline schedule's micro-batches when
pp > 1; `trainer.gradient_clip_val` keeps its meaning and is applied by the module.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Generator, Optional

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from flm_lightning.checkpoint import DISTRIBUTED_METADATA as METADATA
from flm_lightning.checkpoint import is_distributed_checkpoint
from flm_lightning.data.datamodule import micro_batches_per_step
from flm_lightning.engine import StepEngine
from flm_lightning.errors import CheckpointError, ConfigError
from flm_lightning.model import FLMTransformer, ModelConfig
from flm_lightning.parallel.dims import MESH_DIMS, ParallelDims, check_layout
from flm_lightning.parallel.parallelize import DTYPES, apply_fsdp, apply_tensor_parallel
from flm_lightning.parallel.pipeline import build_schedule, split_for_rank, tied_embedding_group

# Optimizer state keyed by parameter name: pipeline stages own different parameters, and the
# nested format's per-group lists collide across stages in DCP (KeyError 'betas' on resume).
OPTIMIZER_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, cpu_offload=True)


class FLMParallelStrategy(ModelParallelStrategy):
    """3D parallelism: FSDP2 over dp, tensor + sequence parallel over tp, pipeline over pp.

    Args:
        tensor_parallel_size: tp degree (divides heads, ffn width, padded vocabulary, sequence).
        pipeline_parallel_size: number of pipeline ranks.
        data_parallel_size: dp degree; default: world size / (tp * pp).
        schedule: "gpipe", "1f1b" or "interleaved1f1b".
        stages_per_rank: virtual stages per pipeline rank (interleaved1f1b: >= 2).
        layout: explicit layer count of each stage (default: as even as possible).
        param_dtype / reduce_dtype: FSDP2 mixed precision ("float32" or "bfloat16"); the usual
            large-model choice is bfloat16 parameters with float32 gradient reduction.
        reshard_after_forward: FSDP2 frees gathered parameters after forward (ZeRO-3) or keeps
            them until backward (ZeRO-2-like, more memory, fewer all-gathers).
        loss_parallel: keep logits vocabulary-sharded into the cross-entropy (no full logits per rank).
        meta_init: build the model on the meta device and materialise only each rank's shards
            (needed when the full model does not fit one process: FLM-101B, Tele-FLM). Every
            layout, with or without it, then initialises each parameter from its own seeded
            generator (`flm_lightning.build`), so all start from the weights of a one-process run.
    """

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: Optional[int] = None,
        schedule: str = "1f1b",
        stages_per_rank: int = 1,
        layout: Optional[list[int]] = None,
        param_dtype: str = "float32",
        reduce_dtype: str = "float32",
        reshard_after_forward: bool = True,
        loss_parallel: bool = True,
        meta_init: bool = False,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = timedelta(minutes=30),
    ) -> None:
        super().__init__(process_group_backend=process_group_backend, timeout=timeout)
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                raise ConfigError(f"trainer.strategy.{name} must be one of {list(DTYPES)}, got {value!r}")
        self.sizes = dict(tp=tensor_parallel_size, pp=pipeline_parallel_size, dp=data_parallel_size)
        self.schedule, self.stages_per_rank = schedule, stages_per_rank
        self.micro_batches = 1  # per step and rank: set from the data module in setup_environment
        self.layout = layout
        self.fsdp = dict(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype, reshard_after_forward=reshard_after_forward
        )
        self.loss_parallel = loss_parallel
        self.meta_init = meta_init
        self.dims: Optional[ParallelDims] = None
        self.mesh: Optional[DeviceMesh] = None  # the (pp, dp, tp) mesh, built in setup_environment

    # ---- layout ---------------------------------------------------------------------------------
    def check(self, arch: ModelConfig, datamodule: Any) -> ParallelDims:
        """The layout for this world size, checked against the model and data (no collective yet); sets
        `micro_batches` from the data module's global and micro-batch sizes."""
        dims = ParallelDims.infer(self.num_nodes * self.num_processes, **self.sizes)
        batch_size = getattr(datamodule, "batch_size", None)
        if batch_size is not None:
            self.micro_batches = micro_batches_per_step(
                getattr(datamodule, "global_batch_size", None), batch_size, dims.dp
            )
        check_layout(
            dims,
            arch,
            seq_len=getattr(datamodule, "seq_len", None),
            micro_batches=self.micro_batches,
            schedule=self.schedule,
            stages_per_rank=self.stages_per_rank,
            layout=self.layout,
        )
        return dims

    def check_growth_target(self, arch: ModelConfig) -> None:
        """Raise ConfigError if growing to `arch` cannot run at the current layout."""
        check_layout(
            self.dims,
            arch,
            micro_batches=self.micro_batches,
            schedule=self.schedule,
            stages_per_rank=self.stages_per_rank,
            layout=self.layout,
        )

    def setup_environment(self) -> None:
        module = self.lightning_module
        trainer = module.trainer
        self.dims = self.check(module.arch, getattr(trainer, "datamodule", None))
        super().setup_environment()  # process group (and Lightning's own 2D mesh, which `device_mesh` replaces)
        self.mesh = init_device_mesh(self.root_device.type, self.dims.shape, mesh_dim_names=MESH_DIMS)
        rank_zero_info(f"FLMParallelStrategy: {self.dims} on {self.world_size} processes ({self.root_device.type})")

    @property
    def device_mesh(self) -> DeviceMesh:
        """The (pp, dp, tp) mesh (`mesh`); the module reads it from its `StepEngine`."""
        if self.mesh is None:
            raise RuntimeError("FLMParallelStrategy.device_mesh is built in setup_environment, not before")
        return self.mesh

    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        """`configure_model` runs in here: on the meta device with meta_init (materialised after sharding)."""
        device = torch.device("meta") if self.meta_init or empty_init else nullcontext()
        with device, self.precision_plugin.tensor_init_context():
            yield

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp = self.device_mesh["dp"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    def parallelize(
        self, model: FLMTransformer, compute: Optional[Callable[[FLMTransformer], None]] = None
    ) -> StepEngine:
        """Split (pp), shard (tp), apply `compute` (activation checkpointing, compile), then FSDP2 (dp),
        all in place (torchtitan's order); return what a step needs."""
        mesh, dims = self.device_mesh, self.dims
        stages, stage_ids = [model], [0]
        if dims.pp > 1:
            stage_ids, stages = split_for_rank(
                model, mesh["pp"].get_local_rank(), dims.pp, self.stages_per_rank, self.layout
            )
        if dims.tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
        if compute is not None:
            compute(model)
        apply_fsdp(model, mesh["dp"], roots=stages, **self.fsdp)
        runtime = StepEngine(
            model=model, micro_batches=self.micro_batches, dims=dims, mesh=mesh, loss_parallel=self.loss_parallel
        )
        if dims.pp > 1:
            n_stages = dims.pp * self.stages_per_rank
            runtime.schedule = build_schedule(
                stages,
                stage_ids,
                n_stages,
                mesh["pp"],
                self.root_device,
                self.schedule,
                self.micro_batches,
                runtime.pipeline_loss,
            )
            runtime.has_first_stage, runtime.has_last_stage = 0 in stage_ids, n_stages - 1 in stage_ids
            if model.config.tie_embeddings:
                runtime.tied_group = tied_embedding_group(mesh)
        return runtime

    # ---- checkpoints ------------------------------------------------------------------------------
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return get_optimizer_state_dict(self.model, optimizer, options=OPTIMIZER_OPTIONS)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        """DCP folder written beside its final name and renamed when every rank is done (atomic)."""
        if storage_options is not None:
            raise TypeError("FLMParallelStrategy.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)
        self.barrier()
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        dcp.save(state, checkpoint_id=partial)
        if self.is_global_zero:
            torch.save(checkpoint, partial / METADATA)
        self.barrier()
        if self.is_global_zero:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            partial.rename(path)
        self.barrier()

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_distributed_checkpoint(path):
            raise CheckpointError(
                f"{path} is not a distributed checkpoint folder of FLMParallelStrategy "
                f"(no {METADATA} / .metadata); start from a single-file checkpoint with model.init_from"
            )
        meta = torch.load(path / METADATA, weights_only=weights_only is not False)
        self.lightning_module.prepare_checkpoint_shape(meta)  # a grown run: rebuild at its shape first
        state: dict[str, Any] = {"state_dict": get_model_state_dict(self.model)}
        for i, optimizer in enumerate(self.optimizers):
            state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, optimizer, options=OPTIMIZER_OPTIONS)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"])
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"], options=OPTIMIZER_OPTIONS)
        return meta
