"""The LightningModule: FLM decoder + FreeLM-unified objective + AdamW with warmup/decay.

The network is built in `configure_model` so a strategy can build it under its own device
or meta context and shard it; everything else (parallelism, growth, μP) is applied from
outside by strategies and callbacks. Every layout, one process included, trains with the same
step (`flm_lightning.engine.StepEngine`): one `training_step` per optimizer step over all its
micro-batches, normalised by the step's trained tokens, one gradient norm, clipping, AdamW.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, is_dataclass, replace
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torchmetrics import MeanMetric

from flm_lightning.callbacks.throughput import logging_step
from flm_lightning.checkpoint import arch_from_checkpoint, load_checkpoint, model_weights
from flm_lightning.errors import ConfigError, DataError
from flm_lightning.model import FLMTransformer, ModelConfig, count_model
from flm_lightning.engine import StepEngine, StepStats
from flm_lightning.mup import MuP, MuPConfig
from flm_lightning.growth import GrowthMasks, MaskPlan, grow, mask_value, transfer_adam_state
from flm_lightning.parallel.compute import apply_activation_checkpointing, apply_compile, check_checkpoint_mode
from flm_lightning.optim import LR_POLICIES, OptimConfig, build_adamw, build_scheduler
from flm_lightning.parallel.growth import full_optimizer_state, gather_for_growth, load_full_optimizer_state
from flm_lightning.parallel.parallelize import initialize_sharded
from flm_lightning.parallel.strategy import FLMParallelStrategy


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as plain containers and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_config(value: Any, cls):
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
    if is_dataclass(value):
        return cls(**asdict(value))
    raise ConfigError(f"expected a {cls.__name__} or a mapping, got {type(value).__name__}")


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
        activation_checkpointing: str = "none",
        compile: bool = False,
    ):
        super().__init__()
        self.arch: ModelConfig = _as_config(arch or ModelConfig(), ModelConfig)
        self.optim_cfg: OptimConfig = _as_config(optim or OptimConfig(), OptimConfig)
        self.mup_cfg: Optional[MuPConfig] = _as_config(mup, MuPConfig) if mup is not None else None
        if self.mup_cfg is not None and self.arch.base_hidden_size is None:
            self.arch = replace(self.arch, base_hidden_size=self.mup_cfg.base_hidden_size)
        if self.mup_cfg is not None:
            MuP(self.mup_cfg, self.arch, self.optim_cfg.lr)  # a bad pairing fails now, before any state exists
        self.init_from = init_from
        check_checkpoint_mode(activation_checkpointing)
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile
        # Plain containers only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({
            "arch": self.arch.to_dict(),
            "optim": self.optim_cfg.to_dict(),
            "init_from": init_from,
            "mup": asdict(self.mup_cfg) if self.mup_cfg is not None else None,
            "activation_checkpointing": activation_checkpointing,
            "compile": compile,
        })
        self.model: Optional[FLMTransformer] = None
        self.engine: Optional[StepEngine] = None  # the step for this rank's model and layout
        self.flops_per_batch: Optional[int] = None  # model FLOPs of one optimizer step's batch on this rank
        self.last_loss: Optional[torch.Tensor] = None  # the last step's loss (read by TrainingGuard)
        self._grad_norm: Optional[torch.Tensor] = None  # this step's global gradient norm, computed once
        # Growth state (saved in checkpoints): LR events, the ramp in progress, the history.
        self.lr_events: list[dict] = []
        self.growth_ramp: Optional[dict] = None
        self.growth_history: list[dict] = []
        self._masks: Optional[GrowthMasks] = None
        self.val_loss = MeanMetric()
        self.val_lm_loss = MeanMetric()
        self.val_teacher_loss = MeanMetric()
        self.val_teacher_acc = MeanMetric()
        self.val_domain_loss = torch.nn.ModuleDict()
        self._val_domains: list[tuple[str, float]] = []

    # ---- construction --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self._trainer is not None and stage == "fit":
            self._check_step_settings()
            # The step runs its micro-batches, clipping and the optimizer itself (manual optimisation).
            # Set after Lightning's configuration checks, which refuse gradient_clip_val under manual
            # optimisation: here it keeps its meaning and is applied in on_before_optimizer_step.
            self.automatic_optimization = False
        data_vocab = getattr(datamodule, "tokenizer_vocab_size", None)
        if data_vocab is not None and data_vocab > self.arch.vocab_size:
            raise ConfigError(
                f"model.arch.vocab_size ({self.arch.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({data_vocab}); set model.arch.vocab_size >= {data_vocab}"
            )
        max_id = getattr(datamodule, "max_token_id", None)
        if max_id is not None and max_id >= self.arch.vocab_size:
            raise DataError(f"the data holds token id {max_id}, beyond model.arch.vocab_size ({self.arch.vocab_size})")
        # Per-domain validation: names and bytes per token of the datamodule's validation loaders.
        self._val_domains = [(n, b) for n, b in getattr(datamodule, "val_domains", []) if b is not None]
        for name, _ in self._val_domains:
            if name not in self.val_domain_loss:
                self.val_domain_loss[name] = MeanMetric().to(self.device)

    def _check_step_settings(self) -> None:
        trainer = self.trainer
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not used: set "
                "data.init_args.global_batch_size (samples per optimizer step over all data-parallel ranks); each "
                "step then runs global_batch_size / (batch_size x data-parallel ranks) micro-batches"
            )
        if trainer.world_size > 1 and not isinstance(trainer.strategy, FLMParallelStrategy):
            raise ConfigError(
                f"trainer.strategy: {type(trainer.strategy).__name__} on {trainer.world_size} processes would "
                "normalise each rank's loss by its own tokens; use flm_lightning.parallel.FLMParallelStrategy "
                "(data parallel alone: tensor_parallel_size 1, pipeline_parallel_size 1)"
            )
        if trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ConfigError(f"trainer.gradient_clip_algorithm must be 'norm', got {trainer.gradient_clip_algorithm!r}")

    def _micro_batches(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(datamodule, "micro_batches", 1))

    @property
    def mup(self) -> Optional[MuP]:
        """The μP rules for the current (possibly grown) architecture."""
        return MuP(self.mup_cfg, self.arch, self.optim_cfg.lr) if self.mup_cfg is not None else None

    def configure_model(self) -> None:
        if self.model is None:
            self._build(self.arch, initial_weights=True)

    def _build(self, arch: ModelConfig, initial_weights: bool) -> None:
        """Build the network at `arch`, initialised (μP, and `init_from` when initial_weights), and
        split/sharded under FLMParallelStrategy."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        load = self.init_from if initial_weights else None
        self.model = FLMTransformer(arch)  # on the meta device under FLMParallelStrategy(meta_init=True)
        if not isinstance(strategy, FLMParallelStrategy):
            self._initialize(load)
            self._apply_compute(self.model)
            self.engine = StepEngine(self.model, micro_batches=self._micro_batches())
            return
        on_meta = any(p.is_meta for p in self.model.parameters())
        if not on_meta:
            self._initialize(load)  # every rank the same full model (same seed): layouts start identical
        self.engine = strategy.parallelize(self.model, self._apply_compute)  # split, TP, compute, FSDP
        if on_meta:
            self.model.to_empty(device=strategy.root_device)
            self.model.rotary.reset_tables()
            init_std = self.mup.init_std if self.mup is not None else self.model.init_std
            initialize_sharded(self.model, init_std, seed=strategy.init_seed)
            if load:
                self._load_initial_weights(load)

    def prepare_checkpoint_shape(self, checkpoint: dict[str, Any]) -> None:
        """Before a sharded checkpoint loads: rebuild (and re-shard) the network at the checkpoint's grown
        architecture, with a fresh optimizer to receive its state. Called by FLMParallelStrategy."""
        saved = ModelConfig.from_dict(checkpoint["hyper_parameters"]["arch"])
        if saved.function_fields() == self.arch.function_fields() or not (checkpoint.get("flm_growth") or {}).get("history"):
            return  # same shape, or a mismatch that on_load_checkpoint reports
        self.arch = saved
        with self.trainer.strategy.tensor_init_context():
            self._build(saved, initial_weights=False)
        self.flops_per_batch = None
        if self.trainer.training:
            self.trainer.strategy.setup_optimizers(self.trainer)

    def _initialize(self, init_from: Optional[str]) -> None:
        """μP initialisation, then the weights of `init_from` when given."""
        if self.mup is not None:
            self.mup.initialize(self.model)
        if init_from:
            self._load_initial_weights(init_from)

    def _apply_compute(self, model: FLMTransformer) -> None:
        """Activation checkpointing, then compile (torchtitan's order); also after growth rebuilds."""
        apply_activation_checkpointing(model, self.activation_checkpointing)
        if self.compile_blocks:
            apply_compile(model)

    def _load_initial_weights(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        theirs, ours = arch_from_checkpoint(ckpt, path).function_fields(), self.arch.function_fields()
        diff = {k: (v, ours[k]) for k, v in theirs.items() if ours[k] != v}
        if diff:
            raise ConfigError(f"model.init_from {path}: model.arch differs from the config's: "
                              + ", ".join(f"{k} is {a} in the checkpoint, {b} in the config" for k, (a, b) in diff.items()))
        weights = model_weights(ckpt)
        if not self.sharded:
            self.model.load_state_dict(weights)
            return
        # A sharded (and possibly pipeline-pruned) model takes the full tensors it holds a part of.
        own = set(self.model.state_dict())
        set_model_state_dict(self.model, {k: v for k, v in weights.items() if k in own},
                             options=StateDictOptions(full_state_dict=True))

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, position_ids=position_ids)

    @property
    def sharded(self) -> bool:
        """Whether the model is split or sharded over processes (FLMParallelStrategy)."""
        return self.engine is not None and self.engine.mesh is not None

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
        self.last_loss, self._grad_norm = stats.loss, None
        optimizer.step()  # runs on_before_optimizer_step: the guard, then the norm and clipping
        scheduler.step()
        self.log("train/loss", stats.loss, prog_bar=True, logger=False)
        self._log_step(stats, step)
        return stats.loss

    def _log_step(self, stats: StepStats, step: int) -> None:
        """Write this optimizer step's values, and only them, on logging steps (at Lightning's step index).

        Written straight to the loggers: a value a step does not have (no teacher tokens in it) is
        left out instead of repeating an earlier step's."""
        if not self.loggers or not logging_step(self.trainer, step + 1):
            return
        metrics = {"train/loss": stats.loss, "train/ppl": torch.exp(stats.loss)}
        if stats.lm_tokens > 0:
            metrics["train/lm_loss"] = stats.lm_loss
        if stats.teacher_tokens > 0:
            metrics["train/teacher_loss"] = stats.teacher_loss
            metrics["train/teacher_acc"] = stats.teacher_acc
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm
        metrics = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        stats = self.engine.eval_step(batch)
        if stats.teacher_tokens > 0:
            self.val_teacher_loss.update(stats.teacher_loss, weight=stats.teacher_tokens)
            self.val_teacher_acc.update(stats.teacher_acc, weight=stats.teacher_tokens)
        if stats.lm_tokens > 0:
            self._update_val_lm(stats.lm_loss, stats.lm_tokens, dataloader_idx)

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """This rank's per-token loss of `batch` with dropout off (the same on every pipeline stage)."""
        training = self.model.training
        self.model.eval()
        try:
            return float(self.engine.eval_step(batch).loss)
        finally:
            self.model.train(training)

    def _update_val_lm(self, loss: torch.Tensor, tokens: torch.Tensor, dataloader_idx: int) -> None:
        # Token-weighted means: an epoch value is the loss over all validation tokens.
        self.val_loss.update(loss, weight=tokens)
        self.val_lm_loss.update(loss, weight=tokens)
        if self._val_domains:
            self.val_domain_loss[self._val_domains[dataloader_idx][0]].update(loss, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count:
            loss = self.val_loss.compute()
            self.log("val/loss", loss, prog_bar=True)
            self.log("val/ppl", torch.exp(loss))
            self.log("val/lm_loss", self.val_lm_loss.compute())
        if self.val_teacher_loss.update_count:
            self.log("val/teacher_loss", self.val_teacher_loss.compute())
            self.log("val/teacher_acc", self.val_teacher_acc.compute())
        if len(self._val_domains) > 1:  # one domain: val/loss says it all
            for name, bytes_per_token in self._val_domains:
                metric = self.val_domain_loss[name] if name in self.val_domain_loss else None
                if metric is not None and metric.update_count:
                    domain_loss = metric.compute()
                    self.log(f"val/{name}/loss", domain_loss)
                    self.log(f"val/{name}/bpb", domain_loss / (math.log(2) * bytes_per_token))
        for metric in (self.val_loss, self.val_lm_loss, self.val_teacher_loss, self.val_teacher_acc,
                       *self.val_domain_loss.values()):
            metric.reset()

    # ---- optimisation --------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.logger is not None:
            size = count_model(self.arch)
            self.logger.log_metrics(
                {"model/parameters": size.parameters, "model/non_embedding_parameters": size.non_embedding_parameters},
                step=self.global_step,
            )

    def grad_norm(self) -> Optional[torch.Tensor]:
        """L2 norm of all gradients of this step (over every shard and stage), computed once per step
        and shared by the guard, clipping and the logs; None without any gradient."""
        if self._grad_norm is None:
            if not any(p.grad is not None for p in self.parameters()):
                return None
            self._grad_norm = self.engine.grad_norm(self.parameters())
        return self._grad_norm

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        clip = self.trainer.gradient_clip_val
        if not clip and not logging_step(self.trainer, self.global_step + 1):
            return  # the norm is only written on logging steps
        if not any(p.grad is not None for p in self.parameters()):
            return  # e.g. the guard dropped this update
        norm = self.grad_norm()
        if clip:  # the norm before clipping is what is logged (what a spike detector wants)
            torch.nn.utils.clip_grads_with_norm_(self.parameters(), clip, norm)

    def build_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.AdamW:
        """AdamW for `model` (default: the current network): μP groups (LR per role) when μP is on."""
        model = model if model is not None else self.model
        groups = self.mup.param_groups(model, self.optim_cfg.weight_decay) if self.mup is not None else None
        # fp16 loss scaling unscales inside a fused step, so clipping would see scaled gradients.
        loss_scaling = self._trainer is not None and self.trainer.precision == "16-mixed"
        return build_adamw(model, self.optim_cfg, groups, allow_fused=not loss_scaling)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        total = self.optim_cfg.decay_steps or self._total_steps()
        scheduler = build_scheduler(optimizer, self.optim_cfg, total, self.lr_events, start_step=self.global_step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- growth ---------------------------------------------------------------------------
    def apply_growth(self, target: ModelConfig, *, mode: str = "stack", init: str = "copy", order=None,
                     ramp_steps: int = 100, lr_policy: str = "rewarmup", rewarmup_steps: int = 100,
                     optimizer_step: str = "keep", seed: int = 0, step: Optional[int] = None):
        """Grow the network in place (function preserving), its optimizer state and LR schedule.

        Inside `fit` the optimizer is rebuilt and its AdamW state carried over here; without a
        trainer (offline growth) the caller does that with the returned (old model, origins).
        """
        if self.sharded:
            self.trainer.strategy.check_growth_target(target)
        step = self.global_step if step is None else step
        self.advance_growth_ramp(step)  # a ramp that ends exactly now is folded first
        if self.growth_ramp is not None:
            raise ConfigError(
                f"cannot grow at step {step}: the ramp of the growth at step "
                f"{self.growth_ramp['start_step']} is still in progress"
            )
        if lr_policy not in LR_POLICIES:
            raise ConfigError(f"lr_policy must be one of {list(LR_POLICIES)}, got {lr_policy!r}")
        in_fit = self._trainer is not None and self.trainer.training
        old_model, old_arch = self.model, self.arch
        old_opt = self.trainer.optimizers[0] if in_fit else None
        sharded = self.sharded
        if sharded:  # grow a gathered full copy, exactly as one process would
            old_model, old_opt = gather_for_growth(self.engine, self.model, old_opt, old_arch, self.build_optimizer)
        initialize = MuP(self.mup_cfg, target, self.optim_cfg.lr).initialize if self.mup_cfg is not None else None
        grown, origin, sources, plan = grow(old_model, target, mode=mode, init=init, order=order, seed=seed,
                                            initialize=initialize)
        self.model, self.arch = grown, target
        self.flops_per_batch = None
        self.growth_ramp = {"plan": asdict(plan), "start_step": step, "ramp_steps": ramp_steps}
        self.lr_events.append({"step": step, "policy": lr_policy, "rewarmup_steps": rewarmup_steps})
        self.growth_history.append({"step": step, "from": old_arch.to_dict(), "to": target.to_dict(),
                                    "layer_sources": [str(x) for x in sources]})
        if sharded:  # (only inside fit: the strategy exists there)
            grown_opt = self.build_optimizer(grown)
            transfer_adam_state(old_opt, old_model, grown_opt, grown, origin, optimizer_step)
            state = full_optimizer_state(grown, grown_opt)
            self.engine = self.trainer.strategy.parallelize(grown, self._apply_compute)  # split and shard it
            self.trainer.strategy.setup_optimizers(self.trainer)  # configure_optimizers on the sharded model
            load_full_optimizer_state(self.model, self.trainer.optimizers[0], state)
        else:
            self._apply_compute(grown)
            self.engine = StepEngine(grown, micro_batches=self._micro_batches())
            if in_fit:
                self.trainer.strategy.setup_optimizers(self.trainer)  # configure_optimizers on the grown model
                transfer_adam_state(old_opt, old_model, self.trainer.optimizers[0], grown, origin, optimizer_step)
        self._masks = self._growth_masks(plan, m=0.0)  # after sharding: hooks on this rank's modules
        if self.growth_ramp["ramp_steps"] <= 0:
            self._fold_masks()
        return old_model, origin

    def _growth_masks(self, plan: MaskPlan, m: float) -> GrowthMasks:
        return GrowthMasks(self.model, plan, m=m, tp_rank=self.engine.tp_rank if self.engine is not None else 0)

    def _fold_masks(self) -> None:
        if self._masks is not None:
            self._masks.remove()
        self._masks, self.growth_ramp = None, None

    def advance_growth_ramp(self, step: int) -> None:
        """Set the masks of the ramp in progress to their value at `step`; fold them once it ends."""
        if self.growth_ramp is not None:
            m = mask_value(step, self.growth_ramp["start_step"], self.growth_ramp["ramp_steps"])
            if m >= 1.0:
                self._fold_masks()
            else:
                self._masks.m = m

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.advance_growth_ramp(self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The current (possibly grown) architecture: exports and tools read it from here.
        checkpoint["hyper_parameters"]["arch"] = self.arch.to_dict()
        checkpoint["rng"] = rng_state()
        checkpoint["flm_growth"] = {
            "ramp": self.growth_ramp,
            "mask_value": self._masks.m if self._masks is not None else None,
            "lr_events": self.lr_events,
            "history": self.growth_history,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        growth = checkpoint.get("flm_growth") or {}
        saved = ModelConfig.from_dict(checkpoint["hyper_parameters"]["arch"])
        if saved.function_fields() != self.arch.function_fields():
            if not growth.get("history"):
                diff = ", ".join(f"{k} is {v} in the checkpoint, {self.arch.function_fields()[k]} in the config"
                                 for k, v in saved.function_fields().items() if self.arch.function_fields()[k] != v)
                raise ConfigError(f"{self._trainer.ckpt_path if self._trainer is not None else 'checkpoint'}: "
                                  f"model.arch differs from the config's: {diff}")
            # A grown run: rebuild the network at its current shape before the weights load.
            device = next(self.model.parameters()).device if self.model is not None else None
            self.arch = saved
            with torch.device(device or "cpu"):
                self.model = FLMTransformer(saved)
            self._apply_compute(self.model)
            self.engine = StepEngine(self.model, micro_batches=self._micro_batches())
            self.flops_per_batch = None
        self.lr_events[:] = growth.get("lr_events", [])
        self.growth_history = growth.get("history", [])
        if self._masks is not None:
            self._masks.remove()
        self._masks, self.growth_ramp = None, growth.get("ramp")
        if self.growth_ramp is not None:
            self._masks = self._growth_masks(MaskPlan(**self.growth_ramp["plan"]), m=growth["mask_value"])
        if "rng" in checkpoint:  # last: rebuilding the network above draws from the generator
            restore_rng_state(checkpoint["rng"])

    def _total_steps(self) -> int:
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ConfigError("set trainer.max_steps (or model.optim.decay_steps): the LR schedule needs a length")
        return int(steps)

