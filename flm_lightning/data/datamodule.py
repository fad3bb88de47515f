"""A small, real data path: documents -> byte-level BPE -> packed token windows.

Documents are split into train and validation by document (never inside one), tokenised,
joined with an end-of-document token and cut into windows of `seq_len + 1` tokens. The
token streams and the tokenizer are cached on disk under a key of everything they depend on,
and written atomically (temporary name, then rename), so an interrupted preparation never
leaves a cache that later loads as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from flm_lightning.data.corpus import corpus_fingerprint, read_documents
from flm_lightning.data.tokenizer import eod_id, load_tokenizer, train_byte_level_bpe
from flm_lightning.errors import ConfigError, DataError


class PackedTokens(Dataset):
    """Consecutive windows of a token stream: sample i is tokens[i*T : i*T + T + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max((len(self.tokens) - 1) // self.seq_len, 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {
            "input_ids": window[:-1],
            "labels": window[1:],
            "loss_mask": torch.ones(self.seq_len, dtype=torch.float32),
        }


class TextDataModule(L.LightningDataModule):
    """Packed causal-LM batches from a text corpus.

    Args:
        corpus: "python-docs" (built in, offline) or a text file, folder of *.txt files or glob.
        tokenizer: a tokenizer.json to use; by default a byte-level BPE of `vocab_size` is
            trained on the training documents.
        vocab_size: size of the trained BPE (ignored when `tokenizer` is given).
        seq_len: tokens per training sample.
        batch_size: samples per batch (per device).
        val_fraction: fraction of documents held out for validation.
        seed: seeds the document split and the sample order.
        cache_dir: where the tokenizer and token streams are cached.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        corpus: str = "python-docs",
        tokenizer: Optional[str] = None,
        vocab_size: int = 2048,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        seed: int = 1234,
        cache_dir: str = ".cache/flm_lightning",
        num_workers: int = 0,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ConfigError(f"data.{name} must be a positive integer, got {value}")
        if vocab_size < 257:
            raise ConfigError(f"data.vocab_size must be at least 257 (256 bytes + end of document), got {vocab_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.corpus, self.tokenizer_path = corpus, tokenizer
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.val_fraction, self.seed, self.num_workers = val_fraction, seed, num_workers
        self.cache_root = Path(cache_dir)
        self.meta: Optional[dict] = None
        self.train_set: Optional[PackedTokens] = None
        self.val_set: Optional[PackedTokens] = None

    # ---- preparation (rank 0) -------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        h = hashlib.sha256()
        h.update(corpus_fingerprint(self.corpus).encode())
        if self.tokenizer_path:
            h.update(Path(self.tokenizer_path).read_bytes() if Path(self.tokenizer_path).is_file() else b"missing")
        else:
            h.update(f"bpe{self.vocab_size}".encode())
        h.update(f"{self.val_fraction}:{self.seed}".encode())
        return self.cache_root / h.hexdigest()[:16]

    def prepare_data(self) -> None:
        out = self.cache_path
        if (out / "meta.json").is_file():
            return
        out.mkdir(parents=True, exist_ok=True)
        docs = read_documents(self.corpus)
        if len(docs) < 2:
            raise DataError(f"data.corpus: {self.corpus!r} has {len(docs)} document(s); need 2+ to hold one out")
        order = list(range(len(docs)))
        random.Random(self.seed).shuffle(order)
        n_val = max(1, round(self.val_fraction * len(docs)))
        val_docs = [docs[i] for i in sorted(order[:n_val])]
        train_docs = [docs[i] for i in sorted(order[n_val:])]
        if self.tokenizer_path:
            tok = load_tokenizer(self.tokenizer_path)
        else:
            tok = train_byte_level_bpe(train_docs, self.vocab_size)
        eod = eod_id(tok)
        dtype = np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
        meta = {
            "corpus": self.corpus,
            "documents": {"train": len(train_docs), "val": len(val_docs)},
            "tokenizer_vocab_size": tok.get_vocab_size(),
            "eod_id": eod,
            "dtype": np.dtype(dtype).name,
            "tokens": {},
        }
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            ids = encode_documents(tok, split_docs, eod, dtype)
            meta["tokens"][split] = int(ids.size)
            _atomic_write(out / f"{split}.bin", ids.tobytes())
        _atomic_write(out / "tokenizer.json", tok.to_str().encode())
        _atomic_write(out / "meta.json", json.dumps(meta, indent=1).encode())  # last: marks the cache valid

    # ---- loading (every rank) -------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.meta is not None:
            return
        out = self.cache_path
        meta_file = out / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"data: cache {out} is missing; prepare_data() has not run")
        self.meta = json.loads(meta_file.read_text())
        dtype = np.dtype(self.meta["dtype"])
        for split in ("train", "val"):
            path = out / f"{split}.bin"
            expected = self.meta["tokens"][split] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"data: {path} is missing or truncated (expected {expected} bytes); delete {out}")
            tokens = np.memmap(path, dtype=dtype, mode="r")
            dataset = PackedTokens(tokens, self.seq_len)
            if len(dataset) == 0:
                raise DataError(f"data: the {split} split has {tokens.size} tokens, fewer than seq_len+1")
            setattr(self, f"{split}_set", dataset)

    @property
    def tokenizer_vocab_size(self) -> int:
        if self.meta is None:
            raise RuntimeError("TextDataModule.setup() has not run")
        return int(self.meta["tokenizer_vocab_size"])

    @property
    def tokenizer_file(self) -> Path:
        return self.cache_path / "tokenizer.json"

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the tokenizer travels with the weights (exports, generation)."""
        if self.meta is None:
            return {}
        return {"tokenizer_json": self.tokenizer_file.read_text(encoding="utf-8")}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # the tokenizer is rebuilt from the cache; a mismatch is caught by the vocab check

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


def encode_documents(tok, docs: list[str], eod: int, dtype) -> np.ndarray:
    """Token ids of `docs`, each followed by the end-of-document id, as one array."""
    pieces = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, dtype=dtype))
        pieces.append(np.asarray([eod], dtype=dtype))
    return np.concatenate(pieces)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
