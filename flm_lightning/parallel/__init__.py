"""Parallelism and compute placement applied from outside the model (torchtitan's parallelize step)."""

from flm_lightning.parallel.dims import ParallelDims
from flm_lightning.parallel.strategy import FLMParallelStrategy

__all__ = ["FLMParallelStrategy", "ParallelDims"]
