"""Documents from plain text, JSONL and Parquet files, folders or globs.

- `.txt` (and any other extension): one document per file.
- `.jsonl` / `.json` (one object per line): one document per line, from `text_field`.
- `.parquet`: one document per row, from the `text_field` column.
Lines that are not valid UTF-8 are skipped and counted (reported, never a crash); a JSONL
line that is not JSON is a `DataError` naming the file and line.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from flm_lightning.errors import DataError

JSONL = (".jsonl", ".json", ".ndjson")
PARQUET = (".parquet",)


@dataclass
class ReadStats:
    files: list[str] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    invalid_utf8_lines: int = 0
    empty_documents: int = 0


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by paths, folders (searched recursively) or globs, sorted and de-duplicated."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        elif path.is_file():
            found = [path]
        else:
            found = [Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()]
        if not found:
            raise DataError(f"--input {item}: no such file, folder or matching glob")
        files.extend(found)
    unique = sorted(set(files))
    if not unique:
        raise DataError("--input names no files")
    return unique


def _decode_lines(raw: bytes, stats: ReadStats) -> Iterator[str]:
    for line in raw.splitlines(keepends=True):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            stats.invalid_utf8_lines += 1


def read_documents(files: list[Path], text_field: str, stats: ReadStats) -> Iterator[str]:
    for path in files:
        stats.files.append(str(path))
        suffix = path.suffix.lower()
        if suffix in PARQUET:
            yield from _parquet(path, text_field, stats)
        elif suffix in JSONL:
            yield from _jsonl(path, text_field, stats)
        else:
            text = "".join(_decode_lines(path.read_bytes(), stats))
            yield from count_document(text, stats)


def count_document(text: str, stats: ReadStats) -> Iterator[str]:
    if not text.strip():
        stats.empty_documents += 1
        return
    stats.documents += 1
    stats.bytes += len(text.encode("utf-8"))
    yield text


def _jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            lines = list(_decode_lines(raw, stats))
            if not lines or not lines[0].strip():
                continue
            try:
                record = json.loads(lines[0])
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{number}: no string field {text_field!r} (set --text-field)")
            yield from count_document(record[text_field], stats)


def _parquet(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}; set --text-field)")
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield from count_document(text, stats)
