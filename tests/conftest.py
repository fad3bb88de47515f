import os

import pytest
import torch

from flm_lightning.model import ModelConfig

# Two cores: one intra-op thread per test process keeps timings stable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FLM_101B_STYLE = dict(
    norm="layernorm", norm_eps=1e-5, activation="gelu", bias=True, position="xpos", tie_embeddings=True
)
TELE_FLM_STYLE = dict(
    norm="rmsnorm", norm_eps=1e-6, activation="swiglu", bias=False, position="rope", tie_embeddings=False
)
FAMILIES = {"flm101b": FLM_101B_STYLE, "teleflm": TELE_FLM_STYLE}


def tiny_config(family: str, **overrides) -> ModelConfig:
    values = dict(vocab_size=100, n_layers=2, n_heads=4, hidden_size=32, max_seq_len=64, **FAMILIES[family])
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def docs_cache(tmp_path_factory):
    """One tokenised python-docs cache shared by the end-to-end tests."""
    return tmp_path_factory.mktemp("cache")


TINY = "conf/tiny.yaml"  # it pins no folder: each test's --trainer.logger.init_args.save_dir holds the whole run
