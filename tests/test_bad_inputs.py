"""The bad-input catalogue: each row is one bad input, its expected message and exit status.

Configs, CLI arguments, data files and checkpoints. Every row must end with exit status 2 and
one line `error: ...` containing the expected text, no traceback, and nothing written before
it may be lost or changed.
"""

import json
from pathlib import Path

import pytest
import torch

from flm_lightning.__main__ import main as tool_main
from flm_lightning.checkpoint import save_weights_checkpoint
from flm_lightning.cli import main as cli_main
from flm_lightning.data import prepare
from flm_lightning.model import FLMTransformer
from tests.conftest import TINY, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory, docs_cache):
    """Files the rows point at: prepared data, damaged copies, checkpoints, a busy output folder."""
    root = tmp_path_factory.mktemp("bad")
    (root / "text").mkdir()
    for i in range(30):
        (root / "text" / f"{i}.txt").write_text(f"Document {i} about foxes and dogs. " * 20)
    prepare([str(root / "text")], str(root / "data"), vocab_size=400, val_fraction=0.1, progress=False)
    prepare([str(root / "text")], str(root / "other_tok"), vocab_size=300, val_fraction=0.1, progress=False)
    prepare([str(root / "text")], str(root / "torn"), vocab_size=400, val_fraction=0.1, progress=False)
    shard = root / "torn" / "train" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (root / "empty.txt").write_text("\n \n")
    cfg = tiny_config("teleflm", vocab_size=400)
    save_weights_checkpoint(root / "model.ckpt", cfg, FLMTransformer(cfg).state_dict(), None)
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, root / "foreign.ckpt")
    (root / "zeros.ckpt").write_bytes(b"\x00" * 64)
    (root / "busy").mkdir()
    (root / "busy" / "keep.txt").write_text("precious")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 400,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            }
        )
    )
    (root / "llama" / "model.safetensors").write_bytes(b"")
    (root / "grow.yaml").write_text("""
trainer:
  callbacks:
    - class_path: flm_lightning.callbacks.GrowthCallback
      init_args:
        stages:
          - {at_step: 5, arch: {hidden_size: 64, n_heads: 2}, ramp_steps: 10}
""")
    (root / "ramp.yaml").write_text("""
trainer:
  callbacks:
    - class_path: flm_lightning.callbacks.GrowthCallback
      init_args:
        stages:
          - {at_step: 5, arch: {n_layers: 5}, ramp_steps: 10}
          - {at_step: 8, arch: {n_layers: 6}}
""")

    def mix(name, sources):
        data = {"class_path": "flm_lightning.data.MixtureDataModule", "init_args": {"sources": sources, "seq_len": 32}}
        (root / name).write_text(json.dumps({"data": data}))

    mix("zero.yaml", [{"path": str(root / "data"), "weight": 0.0}])
    mix("missing.yaml", [{"path": str(root / "nowhere")}])
    mix("mismatch.yaml", [{"path": str(root / "data")}, {"path": str(root / "other_tok"), "name": "b"}])
    mix("torn.yaml", [{"path": str(root / "torn")}])
    mix("ok.yaml", [{"path": str(root / "data")}])
    (root / "small.yaml").write_text("model: {arch: {vocab_size: 400, n_layers: 2, n_heads: 2, hidden_size: 16}}")
    (root / "info_bad.yaml").write_text("model: {arch: {hidden_size: 100, n_heads: 3}}")
    (root / "three_runs.csv").write_text("params,loss\n1e5,4.0\n2e5,3.8\n4e5,3.7\n")
    (root / "rising.csv").write_text("params,loss\n1e5,3.0\n2e5,3.3\n4e5,3.6\n8e5,3.9\n")
    return root, docs_cache


def fit(*extra):
    return lambda root, cache: (
        cli_main,
        [
            "fit",
            "-c",
            TINY,
            f"--data.cache_dir={cache}",
            "--trainer.logger=false",
            "--trainer.max_steps=1",
            *[e.format(root=root) for e in extra],
        ],
    )


def fit_with(config, *extra):
    return lambda root, cache: (
        cli_main,
        [
            "fit",
            "-c",
            TINY,
            "-c",
            str(root / config),
            "--trainer.logger=false",
            "--trainer.max_steps=1",
            f"--data.init_args.cache_dir={cache}" if config.startswith(("grow", "ramp")) else "--trainer.max_steps=1",
            *[e.format(root=root) for e in extra],
        ],
    )


def tool(*args):
    return lambda root, cache: (tool_main, [a.format(root=root) for a in args])


CATALOGUE = [
    # --- configs and CLI arguments of main.py
    (
        "hidden not divisible by heads",
        fit("--model.arch.hidden_size=130"),
        "model.arch.hidden_size (130) is not divisible",
    ),
    ("unknown norm", fit("--model.arch.norm=batchnorm"), "model.arch.norm must be one of"),
    ("unknown activation", fit("--model.arch.activation=relu"), "model.arch.activation must be one of"),
    ("unknown position", fit("--model.arch.position=alibi"), "model.arch.position must be one of"),
    ("negative layers", fit("--model.arch.n_layers=-2"), "model.arch.n_layers must be a positive integer"),
    ("non-integer heads", fit("--model.arch.n_heads=four"), "model.arch.n_heads: expected"),
    (
        "vocab smaller than the tokenizer",
        fit("--model.arch.vocab_size=1000"),
        "smaller than the tokenizer's vocabulary",
    ),
    ("negative learning rate", fit("--model.optim.lr=-1"), "model.optim.lr must be > 0"),
    ("min_lr above lr", fit("--model.optim.min_lr=1.0"), "model.optim.min_lr must be in"),
    ("unknown LR decay", fit("--model.optim.decay=step"), "model.optim.decay must be one of"),
    ("zero batch size", fit("--data.batch_size=0"), "data.batch_size must be a positive integer"),
    ("validation fraction above 1", fit("--data.val_fraction=1.5"), "data.val_fraction must be in (0, 1)"),
    ("unknown trainer option", fit("--trainer.max_stepz=3"), "unknown key trainer.max_stepz (did you mean max_steps?)"),
    (
        "abbreviated trainer option",
        fit("--trainer.max_step=3"),
        "unknown key trainer.max_step (did you mean max_steps?)",
    ),
    ("unknown nested key", fit("--model.arch.n_layer=6"), "unknown key model.arch.n_layer (did you mean n_layers?)"),
    ("invalid precision", fit("--trainer.precision=17"), "trainer.precision: invalid value"),
    ("missing config file", lambda root, cache: (cli_main, ["fit", "-c", str(root / "nope.yaml")]), "nope.yaml"),
    ("init_from another architecture", fit("--model.init_from={root}/model.ckpt"), "model.init_from"),
    (
        "unknown attention backend",
        fit("--model.arch.attention_backend=xformers"),
        "model.arch.attention_backend must be one of",
    ),
    (
        "attention backend not installed",
        fit("--model.arch.attention_backend=flash"),
        "model.arch.attention_backend=flash cannot run: the flash_attn package is not installed",
    ),
    (
        "unknown activation checkpointing",
        fit("--model.activation_checkpointing=most"),
        "model.activation_checkpointing must be one of",
    ),
    ("growth that shrinks", fit_with("grow.yaml"), "GrowthCallback stage 0: growth cannot shrink"),
    ("growth inside a ramp", fit_with("ramp.yaml"), "starts during the ramp"),
    # --- data
    ("mixture weights all zero", fit_with("zero.yaml"), "data.sources: the weights are all zero"),
    ("source not prepared", fit_with("missing.yaml"), "is not a prepared data directory"),
    ("sources with different tokenizers", fit_with("mismatch.yaml"), "prepared with a different tokenizer"),
    ("truncated shard", fit_with("torn.yaml"), "truncated or missing"),
    ("token ids beyond the vocabulary", fit_with("ok.yaml", "--model.arch.vocab_size=300"), "vocab"),
    (
        "prepare: missing input",
        tool("prepare", "--input", "{root}/none", "--output", "{root}/o1", "--vocab-size", "300"),
        "no such file",
    ),
    (
        "prepare: empty input",
        tool("prepare", "--input", "{root}/empty.txt", "--output", "{root}/o2", "--vocab-size", "300"),
        "holds no text",
    ),
    (
        "prepare: JSONL line not JSON",
        tool("prepare", "--input", "{root}/bad.jsonl", "--output", "{root}/o3", "--vocab-size", "300"),
        "bad.jsonl:2: not a JSON object",
    ),
    (
        "prepare: output already prepared",
        tool("prepare", "--input", "{root}/text", "--output", "{root}/data", "--vocab-size", "300"),
        "already prepared",
    ),
    (
        "prepare: vocabulary too small",
        tool("prepare", "--input", "{root}/text", "--output", "{root}/o4", "--vocab-size", "100"),
        "--vocab-size must be at least",
    ),
    # --- checkpoints and model directories
    (
        "validate: corrupted checkpoint",
        lambda root, cache: (
            cli_main,
            ["validate", "-c", TINY, f"--ckpt_path={root}/zeros.ckpt", "--trainer.logger=false"],
        ),
        "zeros.ckpt cannot be read",
    ),
    (
        "export: unknown family",
        tool("export-hf", "--ckpt", "{root}/foreign.ckpt", "--out", "{root}/x1"),
        "not a model of a known family",
    ),
    (
        "export: busy output folder",
        tool("export-hf", "--ckpt", "{root}/model.ckpt", "--out", "{root}/busy"),
        "exists and is not empty",
    ),
    (
        "export: missing checkpoint",
        tool("export-hf", "--ckpt", "{root}/none.ckpt", "--out", "{root}/x2"),
        "does not exist",
    ),
    (
        "import: unsupported Llama features",
        tool("import-hf", "--model", "{root}/llama", "--out", "{root}/x3.ckpt"),
        "grouped-query attention",
    ),
    (
        "grow: target smaller than the model",
        tool("grow", "--ckpt", "{root}/model.ckpt", "--config", "{root}/small.yaml", "--out", "{root}/x4.ckpt"),
        "cannot shrink",
    ),
    (
        "generate: no tokenizer in the checkpoint",
        tool("generate", "--ckpt", "{root}/model.ckpt", "--prompt", "hi"),
        "carries no tokenizer",
    ),
    (
        "info: invalid preset",
        tool("info", "-c", "{root}/info_bad.yaml"),
        "model.arch.hidden_size (100) is not divisible",
    ),
    (
        "bench: --set without a value",
        tool("bench", "-c", "conf/tiny.yaml", "--set", "model.compile"),
        "--set expects KEY=VALUE",
    ),
    ("bench: zero steps", tool("bench", "-c", "conf/tiny.yaml", "--steps", "0"), "--steps must be a positive integer"),
    (
        "coord-check: config without model.mup",
        tool("coord-check", "-c", "{root}/small.yaml", "--out", "{root}/cc"),
        "has no model.mup section",
    ),
    (
        "coord-check: width not a multiple of the head",
        tool("coord-check", "-c", "conf/mup_sweep.yaml", "--widths", "32,40", "--out", "{root}/cc"),
        "width 40 is not a positive multiple of the head size 16",
    ),
    (
        "predict-loss: fewer than 4 runs",
        tool("predict-loss", "--csv", "{root}/three_runs.csv", "--target-params", "1e6", "--out", "{root}/pl"),
        "needs at least 4 runs, got 3",
    ),
    (
        "predict-loss: loss rising with size",
        tool("predict-loss", "--csv", "{root}/rising.csv", "--target-params", "1e6", "--out", "{root}/pl"),
        "the losses do not fall with size",
    ),
    (
        "predict-loss: no runs in the folder",
        tool("predict-loss", "--runs", "{root}/text", "--target-params", "1e6", "--out", "{root}/pl"),
        "holds no TensorBoard event files",
    ),
    (
        "plan: tp not dividing heads",
        tool("plan", "-c", "conf/flm_101b.yaml", "--gpus", "192", "--tp", "3", "--pp", "1"),
        "trainer.strategy.tensor_parallel_size=3 does not divide model.arch.n_heads (80)",
    ),
    (
        "info: unknown key in --set",
        tool("info", "-c", "conf/tiny.yaml", "-c", "{root}/small.yaml", "--set", "model.arch.n_layer=6"),
        "unknown key model.arch.n_layer (did you mean n_layers?)",
    ),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_catalogue_has_at_least_25_rows():
    assert len(CATALOGUE) >= 25 and len({name for name, *_ in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("name, build, expected", CATALOGUE, ids=[row[0] for row in CATALOGUE])
def test_bad_input(name, build, expected, world, capsys):
    root, cache = world
    before = _snapshot(root)
    entry, args = build(root, cache)
    with pytest.raises(SystemExit) as exit_info:
        entry(args)
    assert exit_info.value.code == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert err and expected in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err)
    after = _snapshot(root)
    assert all(after.get(path) == data for path, data in before.items()), "a file written before was changed"
