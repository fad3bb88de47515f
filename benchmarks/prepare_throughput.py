"""`prepare` throughput against the raw `tokenizers` batch encoder on the same input.

The input is the built-in python-docs corpus repeated to about 20 MB of JSONL. The raw figure
is `Tokenizer.encode_batch` over the documents already in memory (the library's best case);
`prepare` reads the file, decodes JSON, encodes, appends end-of-document ids and writes
shards and a manifest. Both use the same tokenizer and the library's own threads.

    python benchmarks/prepare_throughput.py [--repeat 10] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer  # noqa: E402

from flm_lightning.data.corpus import python_docs  # noqa: E402
from flm_lightning.data.prepare import prepare  # noqa: E402
from flm_lightning.data.tokenizer import train_byte_level_bpe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="copies of the corpus (default 10, about 20 MB)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each, median reported")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    docs = list(python_docs()) * args.repeat
    n_bytes = sum(len(d.encode()) for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_byte_level_bpe(docs[: len(docs) // args.repeat], 8192)
        tok.save(str(tmp / "tokenizer.json"))
        with open(tmp / "corpus.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        raw = []
        for _ in range(args.runs):
            t = time.perf_counter()
            tok.encode_batch(docs, add_special_tokens=False)
            raw.append(n_bytes / (time.perf_counter() - t))
        rows = [("tokenizers encode_batch (in memory)", statistics.median(raw))]
        for workers in args.workers:
            rates = []
            for run in range(args.runs):
                t = time.perf_counter()
                prepare(
                    [str(tmp / "corpus.jsonl")],
                    str(tmp / f"out{workers}_{run}"),
                    tokenizer=str(tmp / "tokenizer.json"),
                    workers=workers,
                    progress=False,
                )
                rates.append(n_bytes / (time.perf_counter() - t))
            rows.append((f"prepare --workers {workers} (file -> shards)", statistics.median(rates)))
    base = rows[0][1]
    print(f"input: {n_bytes / 1e6:.1f} MB, {len(docs):,} documents; median of {args.runs} runs")
    print(f"{'':<40} {'MB/s':>8} {'ratio':>7}")
    for name, rate in rows:
        print(f"{name:<40} {rate / 1e6:8.2f} {rate / base:7.2f}")


if __name__ == "__main__":
    main()
