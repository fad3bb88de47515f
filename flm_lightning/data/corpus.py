"""Text sources: the built-in offline corpus and plain-text files.

The default corpus, "python-docs", is real English technical prose that every Python
installation carries: the language reference topics of `pydoc_data` (about 0.5 MB) and the
docstrings of the standard library's modules, classes and functions (about 1.6 MB), read
with `ast` (nothing is imported or executed). One document per topic or per module.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from flm_lightning.data.readers import ReadStats, count_document, expand_inputs

BUILTIN = "python-docs"
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}


def python_docs(stats: Optional[ReadStats] = None) -> Iterator[str]:
    """The built-in corpus, one document per topic or module; counted into `stats` if given."""
    stats = stats if stats is not None else ReadStats()
    for doc in _python_docs():
        yield from count_document(doc, stats)


def _python_docs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(stdlib).parts):
            continue
        doc = module_docstrings(path)
        if doc:
            yield doc


def module_docstrings(path: Path, min_chars: int = 40) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    parts = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes)]
    return "\n\n".join(p for p in parts if p and len(p) >= min_chars)


def corpus_fingerprint(corpus: str) -> str:
    """Cache key of a corpus: Python version for the built-in one, file names, sizes and mtimes otherwise."""
    h = hashlib.sha256(corpus.encode())
    if corpus == BUILTIN:
        h.update(sys.version.encode())
    else:
        for f in expand_inputs([corpus]):
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
