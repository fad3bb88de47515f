"""Parallelism and compute placement applied from outside the model (torchtitan's parallelize step)."""

from flm_lightning.parallel.dims import ParallelDims

__all__ = ["FLMParallelStrategy", "ParallelDims"]


def __getattr__(name: str):
    # The strategy imports the step engine, which imports this package's dims: load it on first use.
    if name == "FLMParallelStrategy":
        from flm_lightning.parallel.strategy import FLMParallelStrategy

        return FLMParallelStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
