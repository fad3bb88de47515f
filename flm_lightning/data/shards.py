"""The prepared-data format: token shards with document indexes and a manifest.

    DIR/manifest.json          format, dtype, vocabulary, tokenizer hash, per split: shards
                               (tokens, documents, sha256), bytes of text; sources; counts
    DIR/tokenizer.json         the tokenizer the ids belong to
    DIR/{train,val}/NNNNN.bin  token ids, little-endian uint16 (vocab <= 65536) or uint32
    DIR/{train,val}/NNNNN.idx  .npy int64: end offset of each document in the shard

Every document ends with the end-of-document id. `prepare` writes into `DIR.partial/` and
renames it to `DIR` only when the manifest is complete, so an interrupted run never leaves a
directory that loads; `PreparedCorpus` checks the manifest, every shard's size and (optionally)
its sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flm_lightning.errors import DataError

FORMAT = "flm-shards-v1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends documents to numbered shards of about `shard_tokens` tokens."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._pieces: list[np.ndarray] = []
        self._ends: list[int] = []
        self._count = 0

    def add(self, tokens: np.ndarray) -> None:
        self._pieces.append(tokens.astype(self.dtype, copy=False))
        self._count += len(tokens)
        self._ends.append(self._count)
        if self._count >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._pieces:
            return
        name = f"{len(self.shards):05d}"
        data = np.concatenate(self._pieces).tobytes()
        (self.folder / f"{name}.bin").write_bytes(data)
        np.save(self.folder / f"{name}.idx.npy", np.asarray(self._ends, dtype=np.int64))
        (self.folder / f"{name}.idx.npy").rename(self.folder / f"{name}.idx")
        self.shards.append(
            {
                "name": name,
                "tokens": self._count,
                "documents": len(self._ends),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._pieces, self._ends, self._count = [], [], 0

    def summary(self) -> dict:
        self.flush()
        return {
            "shards": self.shards,
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
        }


@dataclass
class Shard:
    tokens: np.ndarray  # memmap
    doc_ends: np.ndarray


class PreparedCorpus:
    """A prepared directory, validated on open."""

    def __init__(self, path: str | Path, verify_checksums: bool = False):
        self.path = Path(path)
        manifest_file = self.path / "manifest.json"
        if not manifest_file.is_file():
            hint = (
                " (an interrupted prepare? run it again)"
                if self.path.with_name(self.path.name + ".partial").exists()
                else ""
            )
            raise DataError(f"{self.path} is not a prepared data directory: no manifest.json{hint}")
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_file} is corrupted ({e.msg})") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_file}: unknown format {self.manifest.get('format')!r} (expected {FORMAT})")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.splits = {
            split: self._open(split, verify_checksums) for split in SPLITS if split in self.manifest["splits"]
        }

    @property
    def domain(self) -> str:
        return self.manifest["domain"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer_sha256"]

    @property
    def max_token_id(self) -> int:
        return int(self.manifest["max_token_id"])

    def bytes_per_token(self, split: str) -> float:
        info = self.manifest["splits"][split]
        return info["bytes"] / max(info["tokens"], 1)

    def _open(self, split: str, verify: bool) -> list[Shard]:
        shards = []
        for entry in self.manifest["splits"][split]["shards"]:
            bin_path = self.path / split / f"{entry['name']}.bin"
            idx_path = self.path / split / f"{entry['name']}.idx"
            expected = entry["tokens"] * self.dtype.itemsize
            if not bin_path.is_file() or bin_path.stat().st_size != expected:
                size = bin_path.stat().st_size if bin_path.is_file() else "missing"
                raise DataError(f"{bin_path}: truncated or missing ({size} bytes, manifest says {expected})")
            try:
                ends = np.load(idx_path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{idx_path}: unreadable document index ({e})") from None
            if len(ends) != entry["documents"] or (len(ends) and ends[-1] != entry["tokens"]):
                raise DataError(f"{idx_path}: document index does not match {bin_path}")
            if verify and hashlib.sha256(bin_path.read_bytes()).hexdigest() != entry["sha256"]:
                raise DataError(f"{bin_path}: checksum mismatch (the file is corrupted)")
            shards.append(Shard(np.memmap(bin_path, dtype=self.dtype, mode="r"), ends))
        return shards

    def check_same_tokenizer(self, tokenizer_sha256: str) -> None:
        if tokenizer_sha256 != self.tokenizer_sha256:
            raise DataError(
                f"{self.path}: prepared with a different tokenizer than the other sources / the one configured"
            )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
