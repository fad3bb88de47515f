"""FLM-101B / Tele-FLM pre-training with PyTorch Lightning."""

from pathlib import Path as _Path

# `callbacks/` sits at the repository top and is installed as `flm_lightning.callbacks` (pyproject's
# package-dir). A source checkout used without `pip install` (e.g. a GPU machine without network,
# the project run from its folder) finds it here instead; an installed copy has its own.
_here = _Path(__file__).resolve().parent
if not (_here / "callbacks").is_dir() and (_here.parent / "callbacks" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)
