"""Published parameter counts of the presets (docs/design.md, "The published counts"), counted on the meta device."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from flm_lightning.cli import load_config
from flm_lightning.model import count_model

# (preset, published parameters, tolerance). The Tele-FLM table lists ffn sizes rounded to
# multiples of 64; the proxy's published 283M (and 52.85B, 102.3B) match floor(8d/3) instead,
# see test_published_counts_use_unrounded_ffn. FLM-101B's "101B" is a name: the tied model
# with biases has 101.70B parameters, 100.67B without the embedding.
PUBLISHED = [
    ("tele_flm_52b", 52.85e9, 0.001),
    ("tele_flm_102b", 102.3e9, 0.001),
    ("tele_flm_1t", 1083.74e9, 0.0001),
    ("tele_flm_mup_proxy", 283e6, 0.007),
]


@pytest.mark.parametrize("name, published, tol", PUBLISHED)
def test_tele_flm_counts(name, published, tol):
    config = load_config([f"conf/{name}.yaml"])
    assert count_model(config.arch, config.seq_len).parameters == pytest.approx(published, rel=tol)


@pytest.mark.parametrize(
    "name, published", [("tele_flm_52b", 52.85e9), ("tele_flm_102b", 102.3e9), ("tele_flm_mup_proxy", 283e6)]
)
def test_published_counts_use_unrounded_ffn(name, published):
    arch = load_config([f"conf/{name}.yaml"]).arch
    unrounded = replace(arch, ffn_hidden_size=8 * arch.hidden_size // 3)
    assert count_model(unrounded).parameters == pytest.approx(published, rel=0.001)


def test_flm_101b_count():
    arch = load_config(["conf/flm_101b.yaml"]).arch
    size = count_model(arch)
    assert arch.tie_embeddings and arch.position == "xpos" and arch.ffn_size == 4 * arch.hidden_size
    assert 101e9 <= size.parameters < 102e9
    assert size.non_embedding_parameters == pytest.approx(101e9, rel=0.005)
    # 12 L d^2 + 13 L d per layer (biases, two LayerNorms) + tied embedding + final LayerNorm.
    d, L, V = 10240, 80, 100288  # vocab padded to a multiple of 64
    assert size.parameters == L * (12 * d * d + 13 * d) + V * d + 2 * d


def test_flops_per_token_formula():
    config = load_config(["conf/tele_flm_52b.yaml"])
    size = count_model(config.arch, config.seq_len)
    assert size.flops_per_token == 6 * (size.parameters - 64 * 2 * 8192 - 8192 - 80000 * 8192) + 12 * 64 * 8192 * 4096


def test_info_json_cli():
    out = subprocess.run(
        [sys.executable, "-m", "flm_lightning", "info", "-c", "conf/tele_flm_1t.yaml", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["parameters"] == pytest.approx(1083.74e9, rel=1e-4)
    assert report["flops_per_token"] > 6 * report["parameters"] * 0.99


@pytest.mark.parametrize(
    "content, message",
    [
        ("model: {arch: {n_heads: 3}}", "hidden_size"),
        ("model: [1", "invalid YAML"),
        ("model: {arch: {n_layer: 3}}", "unknown key model.arch.n_layer (did you mean n_layers?)"),
    ],
)
def test_info_bad_config_exits_2(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    out = subprocess.run(
        [sys.executable, "-m", "flm_lightning", "info", "-c", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
