"""LightningDataModules: a mixture of prepared domains (`MixtureDataModule`) and the default
corpus run through the same pipeline (`TextDataModule`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Subset

from flm_lightning.data.corpus import BUILTIN, corpus_fingerprint, python_docs
from flm_lightning.data.mixture import (
    MixtureDataset,
    PackedWindows,
    ResumableSampler,
    SourceSpec,
    TeacherSamples,
    TeacherSpec,
    read_teacher_records,
)
from flm_lightning.data.prepare import prepare, prepare_documents
from flm_lightning.data.shards import PreparedCorpus
from flm_lightning.errors import ConfigError, DataError
from flm_lightning.parallel.dims import micro_batches_per_step  # the layout's arithmetic, used here and by the strategy

TEACHER_DOMAIN = "teacher"


class MixtureDataModule(L.LightningDataModule):
    """Packed causal-LM batches from a weighted mixture of prepared domains, plus FreeLM teacher
    samples, in an order that resumes exactly (see `flm_lightning.data.mixture`).

    Args:
        sources: the domains (prepared directories, weights, epoch caps).
        seq_len: tokens per sample.
        batch_size: samples per micro-batch and data-parallel rank (what one forward pass sees).
        global_batch_size: samples per optimizer step over all data-parallel ranks; default
            `batch_size` x data-parallel ranks (no accumulation). Each step runs
            `global_batch_size / (batch_size x dp)` micro-batches (see `micro_batches_per_step`).
        seed: seeds the per-epoch window permutations and the teacher split.
        teacher: FreeLM teacher / instruction data mixed into every batch.
        reset_at_document_boundaries: restart positions and attention at every end of document.
        val_windows: validation windows per domain (default: all).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        sources: Optional[list[SourceSpec]] = None,
        seq_len: int = 256,
        batch_size: int = 16,
        global_batch_size: Optional[int] = None,
        seed: int = 1234,
        teacher: Optional[TeacherSpec] = None,
        reset_at_document_boundaries: bool = False,
        val_windows: Optional[int] = None,
        num_workers: int = 0,
    ):
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("global_batch_size", global_batch_size)):
            if name == "global_batch_size" and value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{name} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in sources or []]
        for i, s in enumerate(self.sources):
            if not s.weight >= 0 or (s.epochs is not None and s.epochs <= 0):
                raise ConfigError(f"data.sources[{i}]: weight must be >= 0 and epochs > 0 (got {s.weight}, {s.epochs})")
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: the weights are all zero")
        self.teacher = teacher if teacher is None or isinstance(teacher, TeacherSpec) else TeacherSpec(**teacher)
        if self.teacher is not None and not 0 < self.teacher.ratio < 1:
            raise ConfigError(f"data.teacher.ratio must be in (0, 1), got {self.teacher.ratio}")
        self.seq_len, self.batch_size, self.global_batch_size, self.seed = seq_len, batch_size, global_batch_size, seed
        self.reset = reset_at_document_boundaries
        self.val_windows, self.num_workers = val_windows, num_workers
        self.consumed_samples = 0
        self.tokenizer: Optional[Tokenizer] = None
        self.corpora: list[PreparedCorpus] = []

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is not None:
            return
        if not self.sources:
            raise ConfigError("data.sources is empty: list at least one prepared directory")
        self.corpora = [PreparedCorpus(s.path) for s in self.sources]
        first = self.corpora[0]
        for corpus in self.corpora[1:]:
            corpus.check_same_tokenizer(first.tokenizer_sha256)
        self.tokenizer = Tokenizer.from_file(str(first.path / "tokenizer.json"))
        self.eod = int(first.manifest["eod_id"])
        self.names = [s.name or c.domain for s, c in zip(self.sources, self.corpora)]
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"data.sources: domain names must differ, got {self.names}; set name:")
        self.train_parts = [PackedWindows(c, "train", self.seq_len, self.eod, self.reset) for c in self.corpora]
        self.val_parts = [PackedWindows(c, "val", self.seq_len, self.eod, self.reset) for c in self.corpora]
        for name, part in zip(self.names, self.train_parts):
            if len(part) == 0:
                raise DataError(
                    f"data: domain {name!r} has fewer than seq_len + 1 = {self.seq_len + 1} training tokens"
                )
        self.teacher_train = self.teacher_val = None
        if self.teacher is not None:
            records = read_teacher_records(self.teacher.path)
            order = np.random.default_rng(self.seed).permutation(len(records))
            n_val = int(round(self.teacher.val_fraction * len(records)))
            samples = TeacherSamples(
                [records[i] for i in order],
                self.tokenizer,
                self.teacher,
                self.seq_len,
                self.eod,
                self.reset,
                f"data.teacher ({self.teacher.path})",
            )
            self.teacher_val = Subset(samples, range(n_val)) if n_val else None
            self.teacher_train = Subset(samples, range(n_val, len(samples)))
            if len(self.teacher_train) == 0:
                raise DataError("data.teacher: no training records left after the validation split")

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def max_token_id(self) -> int:
        return max(c.max_token_id for c in self.corpora)

    @property
    def val_domains(self) -> list[tuple[str, Optional[float]]]:
        """(name, bytes per token) of each validation dataloader, in order; None for teacher data."""
        domains = [(n, c.bytes_per_token("val")) for n, c, p in zip(self.names, self.corpora, self.val_parts) if len(p)]
        if self.teacher_val is not None:
            domains.append((TEACHER_DOMAIN, None))
        return domains

    # ---- loaders -------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size): tensor and pipeline peers read the same samples."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        shard = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
        return shard.get("rank", trainer.global_rank), shard.get("num_replicas", trainer.world_size)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (see `micro_batches_per_step`)."""
        return micro_batches_per_step(self.global_batch_size, self.batch_size, self._world()[1])

    def global_batch(self) -> int:
        """Samples per optimizer step over all data-parallel ranks."""
        return self.batch_size * self.micro_batches * self._world()[1]

    def train_dataloader(self) -> DataLoader:
        """One batch per optimizer step: this rank's `micro_batches x batch_size` samples of the step's
        global batch, in the stream's order (the step splits it into micro-batches)."""
        rank, world = self._world()
        step_rows = self.batch_size * self.micro_batches
        max_steps = getattr(self.trainer, "max_steps", -1) if self.trainer is not None else -1
        caps = [None if s.epochs is None else int(s.epochs * len(p)) for s, p in zip(self.sources, self.train_parts)]
        if max_steps and max_steps > 0:
            total = max_steps * self.global_batch()
        else:  # one pass: every source once, or up to its cap
            total = sum(len(p) if c is None else c for p, c in zip(self.train_parts, caps))
        parts, weights = list(self.train_parts), [s.weight for s in self.sources]
        if self.teacher_train is not None:
            weights = [w * (1 - self.teacher.ratio) / sum(weights) for w in weights] + [self.teacher.ratio]
            parts.append(self.teacher_train)
            caps.append(None)
        dataset = MixtureDataset(parts, weights, caps, total, self.seed)
        sampler = ResumableSampler(self.consumed_samples, total, step_rows, rank, world)
        return DataLoader(
            dataset,
            batch_size=step_rows,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=True,
            generator=self._generator(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        """Batches of one step's rows per rank (`micro_batches x batch_size`), split into micro-batches by
        the step as in training."""
        sets = []
        for part in self.val_parts:
            if len(part):
                sets.append(Subset(part, range(min(len(part), self.val_windows or len(part)))))
        if self.teacher_val is not None:
            sets.append(self.teacher_val)
        if not sets:
            raise DataError("data: no validation data (prepare with --val-fraction > 0)")
        rank, world = self._world()
        rows = self.batch_size * self.micro_batches
        if world == 1:
            return [
                DataLoader(s, batch_size=rows, shuffle=False, num_workers=self.num_workers, generator=self._generator())
                for s in sets
            ]
        # Data-parallel ranks split each global batch of windows (as in training). Every rank must run
        # the same number of batches (sharded models gather in forward), so a last partial global
        # batch is left out.
        for s in sets:
            if len(s) < rows * world:
                raise DataError(
                    f"data: a validation set of {len(s)} windows is smaller than one global batch "
                    f"({rows} x {world} data-parallel ranks); lower data.batch_size"
                )
        return [
            DataLoader(
                s,
                batch_size=rows,
                num_workers=self.num_workers,
                generator=self._generator(),
                sampler=ResumableSampler(0, len(s), rows, rank, world),
            )
            for s in sets
        ]

    def _generator(self) -> torch.Generator:
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run's dropout masks would shift against the uninterrupted run's.
        return torch.Generator().manual_seed(self.seed)

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The data position (global samples consumed) and the tokenizer, saved in every checkpoint."""
        state = {}
        if self.trainer is not None:
            state["consumed_samples"] = self.trainer.global_step * self.global_batch()
        if self.tokenizer is not None:
            state["tokenizer_json"] = self.tokenizer.to_str()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.consumed_samples = int(state_dict.get("consumed_samples", 0))


class TextDataModule(MixtureDataModule):
    """The default corpus (or text files) through the same pipeline: prepared once into the cache.

    Args:
        corpus: "python-docs" (built in, offline: Python's reference topics and standard-library
            docstrings, about 2 MB of English) or files / folders / globs of .txt, .jsonl, .parquet.
        tokenizer: a tokenizer.json to use; by default a byte-level BPE of `vocab_size` is trained.
        vocab_size: size of the trained BPE (ignored with `tokenizer`).
        seq_len: tokens per sample.
        batch_size: samples per micro-batch and data-parallel rank.
        global_batch_size: samples per optimizer step over all data-parallel ranks (default: no
            accumulation); see `MixtureDataModule`.
        val_fraction: fraction of documents held out for validation.
        seed: seeds the split and the order.
        cache_dir: where the prepared corpus is cached.
        num_workers: DataLoader worker processes.
        reset_at_document_boundaries: restart positions and attention at every end of document.
    """

    def __init__(
        self,
        corpus: str = BUILTIN,
        tokenizer: Optional[str] = None,
        vocab_size: int = 2048,
        seq_len: int = 256,
        batch_size: int = 16,
        global_batch_size: Optional[int] = None,
        val_fraction: float = 0.05,
        seed: int = 1234,
        cache_dir: str = ".cache/flm_lightning",
        num_workers: int = 0,
        reset_at_document_boundaries: bool = False,
    ):
        if vocab_size < 257:
            raise ConfigError(f"data.vocab_size must be at least 257 (256 bytes + end of document), got {vocab_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.corpus, self.tokenizer_path, self.vocab_size, self.val_fraction = (
            corpus,
            tokenizer,
            vocab_size,
            val_fraction,
        )
        self.cache_root = Path(cache_dir)
        super().__init__(
            sources=[],
            seq_len=seq_len,
            batch_size=batch_size,
            global_batch_size=global_batch_size,
            seed=seed,
            num_workers=num_workers,
            reset_at_document_boundaries=reset_at_document_boundaries,
        )
        self.save_hyperparameters()
        self.sources = [SourceSpec(path=str(self.cache_path), name=corpus if corpus == BUILTIN else "text")]

    @property
    def cache_path(self) -> Path:
        h = hashlib.sha256()
        h.update(corpus_fingerprint(self.corpus).encode())
        if self.tokenizer_path:
            path = Path(self.tokenizer_path)
            h.update(path.read_bytes() if path.is_file() else b"missing")
        else:
            h.update(f"bpe{self.vocab_size}".encode())
        h.update(f"{self.val_fraction}:{self.seed}".encode())
        return self.cache_root / h.hexdigest()[:16]

    def prepare_data(self) -> None:
        if (self.cache_path / "manifest.json").is_file():
            return
        options = dict(
            tokenizer=self.tokenizer_path,
            vocab_size=None if self.tokenizer_path else self.vocab_size,
            val_fraction=self.val_fraction,
            seed=self.seed,
            progress=False,
        )
        if self.corpus == BUILTIN:
            prepare_documents(python_docs, str(self.cache_path), domain=BUILTIN, sources=[BUILTIN], **options)
        else:
            prepare([self.corpus], str(self.cache_path), domain="text", **options)

    @property
    def tokenizer_file(self) -> Path:
        return self.cache_path / "tokenizer.json"
