"""The LightningModule: FLM decoder + FreeLM-unified objective + AdamW with warmup/decay.

The network is built in `configure_model` so a strategy can build it under its own device
or meta context and shard it; parallelism is applied by the strategy, growth is decided by
`GrowthCallback` (or `python -m flm_lightning grow`) and kept in a `GrowthState`; this module only
swaps in a grown network and rebuilds its optimizer. Every layout, one process included, trains
with the same step (`flm_lightning.engine.StepEngine`): one `training_step` per optimizer step over
all its micro-batches, normalised by the step's trained tokens, one gradient norm, clipping, AdamW.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

import lightning as L
import torch

from flm_lightning.build import build, install, make_optimizer
from flm_lightning.checkpoint import restore_rng_state, rng_state
from flm_lightning.checks import check_step_settings, check_vocabulary, schedule_length
from flm_lightning.engine import StepEngine
from flm_lightning.growth.state import GrownNetwork, GrowthSpec, GrowthState, checkpoint_arch, grow_host
from flm_lightning.loggers import log_model_size, logging_step, write_step_metrics
from flm_lightning.model import FLMTransformer, ModelConfig, count_model
from flm_lightning.model.config import coerce_config
from flm_lightning.mup import MuP, MuPConfig, with_base_width
from flm_lightning.optim import OptimConfig, build_scheduler
from flm_lightning.parallel.compute import (
    CheckpointMode,
    apply_activation_checkpointing,
    apply_compile,
    check_checkpoint_mode,
)
from flm_lightning.parallel.growth import load_full_optimizer_state
from flm_lightning.validation import ValidationLosses


class FLMLightningModule(L.LightningModule):
    """Pre-training module for both FLM model families.

    Args:
        arch: the model architecture (see `ModelConfig`).
        optim: AdamW and learning-rate schedule (see `OptimConfig`).
        init_from: start from the weights of this checkpoint (e.g. from `import-hf` or another
            run) with a fresh optimizer and schedule; unlike `--ckpt_path`, nothing else resumes.
        mup: μP parametrization (initialisation and per-role learning rates; see `flm_lightning.mup`).
        activation_checkpointing: "none", "full" (recompute whole blocks) or "selective" (keep
            matmul and attention outputs, recompute the rest); see `flm_lightning.parallel.compute`.
        compile: `torch.compile` each transformer block (after activation checkpointing).
    """

    def __init__(
        self,
        arch: Optional[ModelConfig] = None,
        optim: Optional[OptimConfig] = None,
        init_from: Optional[str] = None,
        mup: Optional[MuPConfig] = None,
        activation_checkpointing: CheckpointMode = "none",
        compile: bool = False,
    ):
        super().__init__()
        self.arch: ModelConfig = coerce_config(arch or ModelConfig(), ModelConfig)
        self.optim_cfg: OptimConfig = coerce_config(optim or OptimConfig(), OptimConfig)
        self.mup_cfg: Optional[MuPConfig] = coerce_config(mup, MuPConfig) if mup is not None else None
        self.arch = with_base_width(self.arch, self.mup_cfg)  # a bad pairing fails now, before any state exists
        self.init_from = init_from
        check_checkpoint_mode(activation_checkpointing)
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile
        # Plain containers only, so checkpoints load with weights_only=True.
        self.save_hyperparameters(
            {
                "arch": self.arch.to_dict(),
                "optim": self.optim_cfg.to_dict(),
                "init_from": init_from,
                "mup": asdict(self.mup_cfg) if self.mup_cfg is not None else None,
                "activation_checkpointing": activation_checkpointing,
                "compile": compile,
            }
        )
        self.model: Optional[FLMTransformer] = None
        self.engine: Optional[StepEngine] = None  # the step for this rank's model and layout
        self.flops_per_batch: Optional[int] = None  # model FLOPs of one optimizer step's batch on this rank
        self.last_loss: Optional[torch.Tensor] = None  # the last step's loss (read by TrainingGuard)
        self.growth = GrowthState()  # LR events, the mask ramp in progress, the history (saved in checkpoints)
        self.val_metrics = ValidationLosses()

    def trainer_or_none(self) -> Optional[L.Trainer]:
        """The Trainer running this module, or None (tools and tests use the module without one)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    # ---- construction --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer = self.trainer_or_none()
        datamodule = getattr(trainer, "datamodule", None)
        if trainer is not None and stage == "fit":
            check_step_settings(trainer)
            # Manual optimisation: the step runs micro-batches, clipping and the optimizer itself. Set after Lightning's
            # checks, which refuse gradient_clip_val under it: here it is applied in on_before_optimizer_step.
            self.automatic_optimization = False
        check_vocabulary(self.arch, datamodule)
        self.val_metrics.set_domains(getattr(datamodule, "val_domains", []), self.device)

    @property
    def mup(self) -> Optional[MuP]:
        """The μP rules for the current (possibly grown) architecture."""
        return MuP(self.mup_cfg, self.arch, self.optim_cfg.lr) if self.mup_cfg is not None else None

    @property
    def sharded(self) -> bool:
        """Whether the model is split or sharded over processes (FLMParallelStrategy)."""
        return self.engine is not None and self.engine.mesh is not None

    def configure_model(self) -> None:
        if self.model is None:
            self._build(self.arch, load=self.init_from)

    def _build(self, arch: ModelConfig, load: Optional[str] = None) -> None:
        """This rank's network at `arch`, built, parallelised and initialised by `flm_lightning.build.build`
        (the same weights at every layout), with the weights of `load` when given."""
        self.arch = arch
        self._set(build(arch, self.mup, torch.initial_seed(), load=load, **self._install_args()))

    def _set(self, engine: StepEngine) -> None:
        self.model, self.engine, self.flops_per_batch = engine.model, engine, None

    def _install_args(self) -> dict[str, Any]:
        trainer = self.trainer_or_none()
        micro_batches = int(getattr(getattr(trainer, "datamodule", None), "micro_batches", 1))
        return dict(
            strategy=getattr(trainer, "strategy", None), compute=self._apply_compute, micro_batches=micro_batches
        )

    def _apply_compute(self, model: FLMTransformer) -> None:
        """Activation checkpointing, then compile (torchtitan's order); also after growth rebuilds."""
        apply_activation_checkpointing(model, self.activation_checkpointing)
        if self.compile_blocks:
            apply_compile(model)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, position_ids=position_ids)

    # ---- steps ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimizer step over this rank's share of the global batch (all its micro-batches)."""
        if self.flops_per_batch is None:
            bsz, seq = batch["input_ids"].shape
            self.flops_per_batch = count_model(self.arch, seq_len=seq).flops_per_token * bsz * seq
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        step = self.global_step
        optimizer.zero_grad(set_to_none=True)
        stats = self.engine.train_step(batch, self.manual_backward)
        self.last_loss = stats.loss
        optimizer.step()  # runs on_before_optimizer_step: the guard, then the norm and clipping
        scheduler.step()
        self.log("train/loss", stats.loss, prog_bar=True, logger=False)
        write_step_metrics(self.loggers, self.trainer, step, lambda: stats.train_metrics(self.engine.grad_norm_of_step))
        return stats.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.val_metrics.update(self.engine.eval_step(batch), dataloader_idx)

    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """This rank's per-token loss of `batch` with dropout off (the same on every pipeline stage)."""
        return self.engine.eval_loss(batch)

    def on_validation_epoch_end(self) -> None:
        for name, value in self.val_metrics.compute().items():
            self.log(name, value, prog_bar=name == "val/loss")

    # ---- optimisation --------------------------------------------------------------------
    def on_train_start(self) -> None:
        log_model_size(self.logger, self.arch, self.global_step)

    def grad_norm(self) -> Optional[torch.Tensor]:
        """L2 norm of all gradients of this step over every shard and stage (computed once per step, shared by
        the guard, clipping and the logs); None without any gradient."""
        return self.engine.step_grad_norm(list(self.parameters()))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        clip = self.trainer.gradient_clip_val
        if clip or logging_step(self.trainer, self.global_step + 1):  # else the norm is not written
            self.engine.clip_gradients(list(self.parameters()), clip)

    def build_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.AdamW:
        """AdamW for `model` (default: the current network): μP groups (LR per role) when μP is on."""
        trainer = self.trainer_or_none()
        # fp16 loss scaling unscales inside a fused step, so clipping would see scaled gradients.
        loss_scaling = trainer is not None and trainer.precision == "16-mixed"
        return make_optimizer(self.model if model is None else model, self.optim_cfg, self.mup, not loss_scaling)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        total = schedule_length(self.trainer, self.optim_cfg.decay_steps)
        scheduler = build_scheduler(
            optimizer, self.optim_cfg, total, self.growth.lr_events, start_step=self.global_step
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- a new network (grown by flm_lightning.growth, or a grown checkpoint's) ----------------------
    def apply_growth(self, target: ModelConfig, spec: Optional[GrowthSpec] = None, **options: Any) -> GrownNetwork:
        """Grow to `target` now (`flm_lightning.growth.state.grow_host`); `options`: `GrowthSpec` fields."""
        return grow_host(self, target, spec if spec is not None else GrowthSpec(**options))

    def swap_network(self, model: FLMTransformer, arch: ModelConfig, optimizer_state: Optional[dict] = None) -> None:
        """Make the full plain `model` (at `arch`) this module's network (split and sharded under the strategy);
        inside `fit`, rebuild the optimizer and give it `optimizer_state` (flattened, keyed by parameter name)."""
        self.arch = arch
        self._set(install(model, **self._install_args()))
        trainer = self.trainer_or_none()
        if trainer is not None and trainer.training:
            trainer.strategy.setup_optimizers(trainer)  # configure_optimizers for the new network
            load_full_optimizer_state(self.model, trainer.optimizers[0], optimizer_state)

    def prepare_checkpoint_shape(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the network at a grown checkpoint's architecture before its weights load, with a fresh
        optimizer for its state (`flm_lightning.growth.state.checkpoint_arch` decides). Called by
        FLMParallelStrategy before loading a sharded checkpoint and by `on_load_checkpoint`."""
        trainer = self.trainer_or_none()
        arch = checkpoint_arch(checkpoint, self.arch, trainer.ckpt_path if trainer is not None else "checkpoint")
        if arch is None:
            return
        with trainer.strategy.tensor_init_context() if trainer is not None else torch.device("cpu"):
            self._build(arch)
        if trainer is not None and trainer.optimizers:
            trainer.strategy.setup_optimizers(trainer)

    lr_events = property(lambda self: self.growth.lr_events, doc="The LR events of growth (`growth.lr_events`).")
    growth_ramp = property(lambda self: self.growth.ramp, doc="The mask ramp in progress (`growth.ramp`).")
    _masks = property(lambda self: self.growth.masks, doc="The masks of the ramp in progress (`growth.masks`).")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.growth.advance(self.global_step)  # the masks' value for this step

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The current (possibly grown) architecture: exports and tools read it from here.
        checkpoint["hyper_parameters"]["arch"] = self.arch.to_dict()
        checkpoint["rng"] = rng_state()
        checkpoint["flm_growth"] = self.growth.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.prepare_checkpoint_shape(checkpoint)  # a grown run: the network at its current shape
        self.growth.load_state_dict(checkpoint.get("flm_growth") or {})
        self.growth.attach(self.model, self.engine.tp_rank)
        if "rng" in checkpoint:  # last: rebuilding the network above draws from the generator
            restore_rng_state(checkpoint["rng"])
