"""Tokenise raw text into the prepared-data format (see `shards.py`).

Documents are read in order (sorted files), assigned to train or validation by a seeded
coin per document, tokenised in batches with the Hugging Face `tokenizers` library (its Rust
batch encoder is multi-threaded; `workers` > 1 adds processes), followed by the
end-of-document id, and appended to shards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from flm_lightning.data.readers import ReadStats, expand_inputs, read_documents
from flm_lightning.data.shards import FORMAT, ShardWriter, sha256_text, token_dtype
from flm_lightning.data.tokenizer import EOD_TOKEN, eod_id, load_tokenizer, train_byte_level_bpe
from flm_lightning.errors import DataError

CHUNK_DOCS = 1024
_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(docs: list[str]) -> list[list[int]]:
    return [e.ids for e in _WORKER_TOKENIZER.encode_batch(docs, add_special_tokens=False)]


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(docs, size)):
        yield chunk


def prepare(inputs: list[str], output: str, text_field: str = "text", **options) -> dict:
    """Prepare the files named by `inputs` (paths, folders, globs) into `output`; returns the manifest."""
    files = expand_inputs(inputs)

    def documents(stats: ReadStats) -> Iterator[str]:
        return read_documents(files, text_field, stats)

    return prepare_documents(
        documents,
        output,
        sources=[str(f) for f in files],
        total_bytes=None if any(f.suffix == ".parquet" for f in files) else sum(f.stat().st_size for f in files),
        text_field=text_field,
        **options,
    )


def prepare_documents(
    documents,
    output: str,
    sources: list[str],
    total_bytes: Optional[int] = None,
    tokenizer: Optional[str] = None,
    vocab_size: Optional[int] = None,
    domain: str = "default",
    workers: int = 1,
    text_field: str = "text",
    val_fraction: float = 0.01,
    seed: int = 1234,
    shard_tokens: int = 1 << 26,
    special_tokens: tuple[str, ...] = (),
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare the documents that `documents(stats)` yields (it may be called twice: once to train
    the tokenizer) into `output`; returns the manifest."""
    if (tokenizer is None) == (vocab_size is None):
        raise DataError("give exactly one of --tokenizer tokenizer.json and --vocab-size N")
    if vocab_size is not None and vocab_size < 257 + len(special_tokens):
        raise DataError(
            f"--vocab-size must be at least {257 + len(special_tokens)} (bytes + special tokens), got {vocab_size}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    out = Path(output)
    if (out / "manifest.json").exists() and not force:
        raise DataError(f"{out} is already prepared; pass --force to prepare it again")
    started = time.perf_counter()

    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if special_tokens:
            tok.add_special_tokens(list(special_tokens))
    else:
        stats = ReadStats()
        tok = train_byte_level_bpe(documents(stats), vocab_size, extra_special_tokens=list(special_tokens))
        if stats.documents == 0:
            raise DataError(f"--input holds no text ({len(sources)} sources, {stats.empty_documents} empty documents)")
    eod = eod_id(tok)
    tokenizer_json = tok.to_str()
    dtype = token_dtype(tok.get_vocab_size())

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
    staging.mkdir(parents=True)
    writers = {split: ShardWriter(staging / split, dtype, shard_tokens) for split in ("train", "val")}
    split_bytes = {"train": 0, "val": 0}
    rng = np.random.default_rng(seed)
    stats = ReadStats()
    max_id = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"prepare {domain}", disable=not progress)
    docs = documents(stats)
    pool = get_context("fork").Pool(workers, _init_worker, (tokenizer_json,)) if workers > 1 else None
    try:
        chunks = _chunks(docs, CHUNK_DOCS)
        if pool is None:
            encoded = ((c, [e.ids for e in tok.encode_batch(c, add_special_tokens=False)]) for c in chunks)
        else:
            pending = ((c, pool.apply_async(_encode_chunk, (c,))) for c in chunks)
            encoded = _ordered(pending, workers * 2)
        for chunk, ids in encoded:
            for text, doc_ids in zip(chunk, ids):
                split = "val" if rng.random() < val_fraction else "train"
                arr = np.empty(len(doc_ids) + 1, dtype=dtype)
                arr[:-1] = doc_ids
                arr[-1] = eod
                max_id = max(max_id, int(arr.max()))
                writers[split].add(arr)
                n_bytes = len(text.encode("utf-8"))
                split_bytes[split] += n_bytes
                bar.update(n_bytes)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    if stats.documents == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"--input holds no text ({len(sources)} sources, {stats.empty_documents} empty documents)")
    splits = {split: {**w.summary(), "bytes": split_bytes[split]} for split, w in writers.items()}
    (staging / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    manifest = {
        "format": FORMAT,
        "domain": domain,
        "dtype": dtype.str,
        "vocab_size": tok.get_vocab_size(),
        "eod_id": eod,
        "eod_token": EOD_TOKEN,
        "max_token_id": max_id,
        "tokenizer_sha256": sha256_text(tokenizer_json),
        "special_tokens": list(special_tokens),
        "splits": splits,
        "sources": sources,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "documents": stats.documents,
        "empty_documents": stats.empty_documents,
        "invalid_utf8_lines": stats.invalid_utf8_lines,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks it complete
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def _ordered(pending, window: int):
    """Results of async tasks in submission order, keeping at most `window` in flight."""
    queue = []
    for item in pending:
        queue.append(item)
        if len(queue) >= window:
            chunk, result = queue.pop(0)
            yield chunk, result.get()
    for chunk, result in queue:
        yield chunk, result.get()
