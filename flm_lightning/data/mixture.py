"""Domain mixtures over prepared corpora, FreeLM teacher samples, and an exactly resumable order.

The training stream is a deterministic function of (sources, weights, epoch caps, seed):
- Blending: the k-th sample of source s gets the time (k + 0.5) / w_s; sorting all times gives
  the global order. Every prefix of the stream holds each source in proportion to its weight
  (to within one sample), with no random draw; a source whose epoch cap is reached drops out
  and the others fill in. FreeLM teacher samples are one more source with weight = ratio, so
  they are spread evenly: every batch holds ratio x batch of them, to within one.
- Within a source, sample k is window `perm_e[k mod n]` of epoch e = k div n, with a fresh
  seeded permutation per epoch.
- Sample i of the stream is always the same; a run resumes at "consumed samples" and sees
  exactly the samples an uninterrupted run would have seen, whatever the data-parallel size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset, Sampler

from flm_lightning.data.shards import PreparedCorpus
from flm_lightning.errors import DataError


@dataclass
class SourceSpec:
    """One domain of the mixture."""

    path: str
    """A directory written by `python -m flm_lightning prepare`."""
    weight: float = 1.0
    """Sampling weight (normalised over all sources)."""
    epochs: Optional[float] = None
    """At most this many passes over the source (fractions allowed); None: no cap."""
    name: Optional[str] = None
    """The name in logs; default the prepared domain name."""


@dataclass
class TeacherSpec:
    """FreeLM teacher data, mixed into every batch."""

    path: str
    """JSONL of {"text", "proposition", "label": true|false} (judgement samples, scored on the label token
    only) and/or {"prompt", "response"} (instruction samples, prompt masked)."""
    ratio: float = 0.1
    """Fraction of the rows of every batch."""
    true_token: str = "\U0001f608"
    """Label token for true propositions (FLM-101B used two emoji)."""
    false_token: str = "\U0001f621"
    """Label token for false ones. Both must be single tokens of the tokenizer (prepare with
    --special-tokens to make them so)."""
    val_fraction: float = 0.1
    """Records held out for validation (teacher loss and accuracy)."""


class PackedWindows:
    """Windows of seq_len + 1 tokens over the shards of one split (windows never cross shards)."""

    def __init__(self, corpus: PreparedCorpus, split: str, seq_len: int, eod: int, reset_at_documents: bool):
        self.shards = corpus.splits.get(split, [])
        self.seq_len, self.eod, self.reset = seq_len, eod, reset_at_documents
        counts = [max((len(s.tokens) - 1) // seq_len, 0) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[shard])) * self.seq_len
        window = torch.from_numpy(self.shards[shard].tokens[start : start + self.seq_len + 1].astype(np.int64))
        sample = {"input_ids": window[:-1], "labels": window[1:], "loss_mask": torch.ones(self.seq_len)}
        if self.reset:
            sample.update(document_masks(window[:-1], self.eod))
        return sample


def document_masks(input_ids: torch.Tensor, eod: int) -> dict[str, torch.Tensor]:
    """Positions restarting after every end-of-document token, and causal attention within documents."""
    is_eod = (input_ids == eod).long()
    doc = torch.cumsum(is_eod, 0) - is_eod  # the EOD token belongs to the document it ends
    idx = torch.arange(len(input_ids))
    starts = torch.zeros_like(idx)
    boundary = torch.nonzero(is_eod).flatten() + 1
    for b in boundary.tolist():
        if b < len(idx):
            starts[b:] = b
    mask = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    return {"position_ids": idx - starts, "attention_mask": mask[None]}


class TeacherSamples:
    """Teacher (judgement) and instruction records as fixed-length samples."""

    def __init__(
        self,
        records: list[dict],
        tok: Tokenizer,
        spec: TeacherSpec,
        seq_len: int,
        eod: int,
        reset_at_documents: bool,
        where: str,
    ):
        self.seq_len, self.eod, self.reset = seq_len, eod, reset_at_documents
        self.label_ids = {
            True: _single_token(tok, spec.true_token, where),
            False: _single_token(tok, spec.false_token, where),
        }
        self.samples = [self._build(r, tok, f"{where} record {i}") for i, r in enumerate(records)]

    def _build(self, record: dict, tok: Tokenizer, where: str) -> tuple[list[int], list[int]]:
        if {"text", "proposition", "label"} <= record.keys():
            if not isinstance(record["label"], bool):
                raise DataError(f"{where}: 'label' must be true or false, got {record['label']!r}")
            body = tok.encode(f"{record['text']} {record['proposition']}", add_special_tokens=False).ids
            body = body[-(self.seq_len) :]  # keep the proposition next to its verdict
            ids = body + [self.label_ids[record["label"]]]
            trained = [len(ids) - 1]  # only the label token
        elif {"prompt", "response"} <= record.keys():
            prompt = tok.encode(record["prompt"], add_special_tokens=False).ids
            response = tok.encode(record["response"], add_special_tokens=False).ids + [self.eod]
            ids = (prompt + response)[: self.seq_len + 1]
            trained = list(range(len(prompt), len(ids)))
        else:
            raise DataError(f"{where}: needs text/proposition/label or prompt/response fields")
        return ids, trained

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, trained = self.samples[index]
        padded = torch.full((self.seq_len + 1,), self.eod, dtype=torch.long)
        padded[: len(ids)] = torch.tensor(ids)
        mask = torch.zeros(self.seq_len + 1)
        mask[trained] = 1.0
        sample = {
            "input_ids": padded[:-1],
            "labels": padded[1:],
            "loss_mask": mask[1:],
            "is_teacher": torch.tensor(True),
        }
        if self.reset:
            sample.update(document_masks(padded[:-1], self.eod))
        return sample


def _single_token(tok: Tokenizer, token: str, where: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:
        ids = tok.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise DataError(
                f"{where}: label token {token!r} is {len(ids)} tokens in this tokenizer; prepare the corpus "
                f"with --special-tokens {token!r} (or choose a token that is one token)"
            )
        token_id = ids[0]
    return token_id


def read_teacher_records(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.teacher.path: {file} does not exist")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{file}:{number}: not a JSON object")
        records.append(record)
    if not records:
        raise DataError(f"data.teacher.path: {file} holds no records")
    return records


def blend(weights: list[float], caps: list[Optional[int]], total: int) -> tuple[np.ndarray, np.ndarray]:
    """For samples 0..total-1: (source index, index within that source). See the module docstring."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    limit = np.array([np.inf if c is None else c for c in caps])
    if limit.sum() < total:
        raise DataError(
            f"the mixture holds {int(limit.sum())} samples within its epoch caps but the run needs {total}: "
            f"raise the sources' epochs or lower trainer.max_steps"
        )

    def available(t: float) -> float:  # samples with time <= t
        return float(np.minimum(limit, np.floor(t * w + 0.5)).sum())

    lo, hi = 0.0, 1.0
    while available(hi) < total:
        hi *= 2
    for _ in range(100):  # bisection for the time by which `total` samples exist
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if available(mid) < total else (lo, mid)
    counts = np.minimum(limit, np.ceil(hi * w) + 1).astype(np.int64)
    times = np.concatenate([(np.arange(n) + 0.5) / ws for n, ws in zip(counts, w)])
    source = np.concatenate([np.full(n, s, dtype=np.int64) for s, n in enumerate(counts)])
    rank = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
    order = np.argsort(times, kind="stable")[:total]
    return source[order], rank[order]


class MixtureDataset(Dataset):
    """Global sample i -> a training sample, by the deterministic blend."""

    def __init__(self, parts: list, weights: list[float], caps: list[Optional[int]], total: int, seed: int):
        self.parts, self.seed = parts, seed
        self.source, self.rank = blend(weights, caps, total)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, k = int(self.source[index]), int(self.rank[index])
        part = self.parts[s]
        epoch, within = divmod(k, len(part))
        key = (s, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, s, epoch]).permutation(len(part))
        sample = part[int(self._perms[key][within])]
        sample.setdefault("is_teacher", torch.tensor(False))
        return sample


class ResumableSampler(Sampler[int]):
    """This rank's share of global samples [start, total): each global batch of
    batch_size x world_size consecutive samples, rank r taking the r-th slice of batch_size."""

    def __init__(self, start: int, total: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.total, self.batch_size, self.rank, self.world = start, total, batch_size, rank, world_size

    def __iter__(self):
        step = self.batch_size * self.world
        for base in range(self.start, self.total - step + 1, step):
            first = base + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)

    def __len__(self) -> int:
        # The whole stream, not what is left of it: after a resume Lightning counts the batches
        # already done in this epoch, and the epoch must end where the uninterrupted one ends.
        return self.total // (self.batch_size * self.world) * self.batch_size
