"""Parallelism and compute placement applied from outside the model (torchtitan's parallelize step)."""
