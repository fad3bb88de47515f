"""FLMParallelStrategy on CPU/gloo: every layout trains the single-process model step for step.

Layouts run as forked local ranks (flm_lightning.parallel.launch); the reference is the plain
one-process fit with Lightning's default strategy, on the same global batches.
"""

import copy

import pytest
import torch

from flm_lightning.checkpoint import model_from_checkpoint, read_checkpoint
from flm_lightning.cli import main
from flm_lightning.data.datamodule import micro_batches_per_step
from flm_lightning.errors import CheckpointError, ConfigError
from flm_lightning.model import FLMTransformer
from flm_lightning.parallel.dims import ParallelDims, check_layout, stage_layers
from flm_lightning.parallel.launch import run_forked
from flm_lightning.parallel.pipeline import split_for_rank
from flm_lightning.tools.compare_layouts import layout_overrides, parse_layout, run_layout, train_layout
from flm_lightning.tools.consolidate import consolidate_checkpoint
from tests.conftest import tiny_config

STEPS, GLOBAL_BATCH, TOL = 10, 8, 1e-5
DIST_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
)
FLM_101B_FAMILY = [
    "--model.arch.norm=layernorm",
    "--model.arch.activation=gelu",
    "--model.arch.bias=true",
    "--model.arch.position=xpos",
    "--model.arch.tie_embeddings=true",
]
CONFIG = """\
seed_everything: 1234
trainer:
  accelerator: cpu
  gradient_clip_val: 1.0
model:
  arch: {{vocab_size: 512, n_layers: 4, n_heads: 4, hidden_size: 64, max_seq_len: 32}}
  optim: {{lr: 3.0e-3, warmup_steps: 3}}
data:
  class_path: flm_lightning.data.TextDataModule
  init_args: {{vocab_size: 512, seq_len: 32, batch_size: 8, cache_dir: {cache}}}
"""


@pytest.fixture(scope="module")
def config(docs_cache, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("parallel") / "small.yaml"
    path.write_text(CONFIG.format(cache=docs_cache))
    return str(path)


@pytest.fixture(scope="module")
def reference(config) -> dict[str, list[float]]:
    """Per-step losses of the plain single-process fit, per family."""
    return {
        family: train_layout(config, layout_overrides(None, GLOBAL_BATCH, STEPS) + extra, None)["train"]
        for family, extra in (("teleflm", []), ("flm101b", FLM_101B_FAMILY))
    }


def _losses(config, tmp_path, layout, extra=(), schedule="1f1b", part="train", **kwargs):
    dims = parse_layout(layout)
    overrides = layout_overrides(dims, GLOBAL_BATCH, STEPS, schedule=schedule, micro_batches=2) + list(extra)
    return run_layout(config, dims, overrides, str(tmp_path), layout, **kwargs)[part]


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "family,layout,schedule",
    [
        ("teleflm", "1x1x1", "1f1b"),
        ("teleflm", "1x2x1", "1f1b"),
        ("teleflm", "1x1x2", "1f1b"),
        ("teleflm", "2x1x1", "1f1b"),
        ("teleflm", "2x1x1", "gpipe"),
        ("teleflm", "2x1x1", "interleaved1f1b"),
        ("teleflm", "2x2x2", "1f1b"),
        ("flm101b", "1x2x1", "1f1b"),
        ("flm101b", "1x1x2", "1f1b"),
        ("flm101b", "1x2x2", "1f1b"),
        ("flm101b", "2x1x1", "interleaved1f1b"),  # tied embedding: first and last stage on different ranks
        ("flm101b", "2x2x2", "1f1b"),
    ],
)
def test_layout_reproduces_single_process_losses(config, reference, tmp_path, family, layout, schedule):
    extra = FLM_101B_FAMILY if family == "flm101b" else []
    losses = _losses(config, tmp_path, layout, extra, schedule)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3  # it trains
    assert _max_diff(losses, reference[family]) < TOL


def test_bf16_parameters_with_fp32_reduction_track_the_fp32_run(config, reference, tmp_path):
    """FSDP2 mixed precision (bf16 compute, fp32 gradient reduction) at pp2 x dp2 x tp2: bf16 rounding only."""
    losses = _losses(config, tmp_path, "2x2x2", ["--trainer.strategy.init_args.param_dtype=bfloat16"])
    assert 0 < _max_diff(losses, reference["teleflm"]) < 5e-3


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_between_tensor_parallel_and_fsdp(config, reference, tmp_path, mode):
    """Recompute applied in the strategy's order (TP -> checkpointing -> FSDP) changes no loss."""
    losses = _losses(config, tmp_path, "2x2x2", [f"--model.activation_checkpointing={mode}"])
    assert _max_diff(losses, reference["teleflm"]) < TOL


def test_mup_groups_survive_sharding(config, tmp_path):
    mup = ["--model.mup.base_hidden_size=32", "--model.mup.matrix_lr=1e-2"]
    plain = train_layout(config, layout_overrides(None, GLOBAL_BATCH, STEPS) + mup, None)["train"]
    assert _max_diff(_losses(config, tmp_path, "1x2x2", mup), plain) < TOL


def test_meta_init_gives_the_same_weights_at_every_layout(config, tmp_path):
    """meta_init (for models one process cannot hold): shards initialised after sharding, from per-parameter
    generators, so 1x1x1 and 2x2x2 start alike and train alike, with μP's init rules too."""
    extra = ["--trainer.strategy.init_args.meta_init=true", "--model.mup.base_hidden_size=32"]
    one = _losses(config, tmp_path, "1x1x1", extra)
    assert one[-1] < one[0] - 0.2
    assert _max_diff(_losses(config, tmp_path, "2x2x2", extra), one) < TOL


def test_validation_runs_on_every_stage(config, tmp_path):
    """Validation mid-fit and at the end under pp2 x dp2 x tp2 gives the one-process validation losses."""
    validating = ["--trainer.limit_val_batches=3", "--trainer.val_check_interval=5"]
    plain = train_layout(config, layout_overrides(None, GLOBAL_BATCH, STEPS) + validating, None)["val"]
    assert len(plain) == 2
    assert _max_diff(_losses(config, tmp_path, "2x2x2", validating, part="val"), plain) < TOL


def _save_at_step_5(config, tmp_path, layout, extra=()):
    ckpts = tmp_path / "ckpts"
    saving = [
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpts}",
        "--trainer.callbacks.every_n_train_steps=5",
        "--trainer.callbacks.save_top_k=-1",
    ]
    _losses(config, tmp_path, layout, [*extra, *saving])
    return ckpts / "epoch=0-step=5.ckpt"


def test_resume_at_another_layout(config, reference, tmp_path):
    """Saved at pp2 x dp2 x tp2 after 5 steps; resumed at 1x1x1 and 1x2x2: the remaining losses are the
    uninterrupted run's. Consolidated, the same checkpoint is one weights file for the tools."""
    folder = _save_at_step_5(config, tmp_path, "2x2x2")
    assert (folder / ".metadata").is_file() and len(list(folder.glob("*.distcp"))) == 8
    for layout in ("1x1x1", "1x2x2"):
        resumed = _losses(config, tmp_path / layout, layout, ckpt_path=str(folder))
        assert len(resumed) == STEPS - 5
        assert _max_diff(resumed, reference["teleflm"][5:]) < TOL, layout

    with pytest.raises(CheckpointError, match="consolidate"):
        read_checkpoint(folder)
    consolidate_checkpoint(folder, tmp_path / "one.ckpt")
    model, ckpt = model_from_checkpoint(tmp_path / "one.ckpt")  # strict: every weight present, full shapes
    assert ckpt["global_step"] == 5
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in ckpt["state_dict"].values())


# ---- layout checks: one message, before any process group ----------------------------------------
@pytest.mark.parametrize(
    "kwargs,world,message",
    [
        (dict(tp=3), 4, "not divisible by tensor_parallel_size x pipeline_parallel_size = 3 x 1"),
        (dict(tp=2, dp=4), 4, "data_parallel_size=4 does not fit world size 4"),
        (dict(tp=0), 4, "tensor_parallel_size must be an integer >= 1"),
    ],
)
def test_layout_must_fit_the_world(kwargs, world, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims.infer(world, **kwargs)


@pytest.mark.parametrize(
    "dims,arch,kwargs,message",
    [
        ((1, 1, 8), {}, {}, r"tensor_parallel_size=8 does not divide model.arch.n_heads \(4\)"),
        ((1, 1, 4), dict(ffn_hidden_size=90), {}, r"does not divide the ffn width \(90\)"),
        ((1, 1, 2), {}, dict(seq_len=31), r"does not divide the sequence length 31"),
        ((4, 1, 1), dict(n_layers=2), dict(micro_batches=4), r"4 pipeline stages .* only 2 layers"),
        ((2, 1, 1), {}, dict(micro_batches=1), r"1 micro-batch\(es\) per step .* fewer than pipeline_parallel_size=2"),
        ((2, 1, 1), {}, dict(micro_batches=2, layout=[1, 2]), r"layout=\[1, 2\] must list 2 positive layer counts"),
        ((2, 1, 1), {}, dict(micro_batches=2, schedule="zb"), r"schedule must be one of"),
    ],
)
def test_layout_must_fit_the_model(dims, arch, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(ParallelDims(*dims), tiny_config("teleflm", n_layers=arch.pop("n_layers", 4), **arch), **kwargs)


# One bad setting each, of both former rule sets (the strategy's and the planner's); the message is the
# strategy's, with its names. (pp, dp, tp), data.batch_size, data.global_batch_size, schedule, stages_per_rank,
# model.arch overrides, sequence length, message.
BAD_LAYOUTS = [
    (
        (1, 1, 3),
        1,
        8,
        "1f1b",
        1,
        {},
        32,
        "trainer.strategy.tensor_parallel_size=3 does not divide model.arch.n_heads (4)",
    ),
    (
        (1, 1, 4),
        1,
        8,
        "1f1b",
        1,
        dict(ffn_hidden_size=90),
        32,
        "trainer.strategy.tensor_parallel_size=4 does not divide the ffn width (90)",
    ),
    (
        (1, 1, 2),
        1,
        8,
        "1f1b",
        1,
        dict(vocab_size=101, pad_vocab_multiple=1),
        32,
        "trainer.strategy.tensor_parallel_size=2 does not divide the padded vocabulary (101)",
    ),
    (
        (1, 1, 2),
        1,
        8,
        "1f1b",
        1,
        {},
        31,
        "trainer.strategy.tensor_parallel_size=2 does not divide the sequence length 31 "
        "(sequence parallelism splits it)",
    ),
    (
        (4, 1, 1),
        1,
        8,
        "1f1b",
        1,
        dict(n_layers=2),
        32,
        "trainer.strategy: 4 pipeline stages (pipeline_parallel_size=4 x stages_per_rank=1) but only 2 layers "
        "(model.arch.n_layers)",
    ),
    (
        (2, 1, 1),
        1,
        8,
        "interleaved1f1b",
        3,
        {},
        32,
        "trainer.strategy: 6 pipeline stages (pipeline_parallel_size=2 x stages_per_rank=3) but only 4 layers "
        "(model.arch.n_layers)",
    ),
    (
        (2, 1, 1),
        4,
        4,
        "1f1b",
        1,
        {},
        32,
        "1 micro-batch(es) per step (data.global_batch_size / (data.batch_size x dp)) is fewer than "
        "pipeline_parallel_size=2: the pipeline would idle; raise data.global_batch_size or lower data.batch_size",
    ),
    (
        (2, 2, 1),
        1,
        7,
        "1f1b",
        1,
        {},
        32,
        "data.global_batch_size=7 is not a multiple of data.batch_size x data-parallel ranks = 1 x 2; each optimizer "
        "step must run a whole number of micro-batches on every rank",
    ),
    (
        (2, 1, 1),
        1,
        8,
        "interleaved",
        2,
        {},
        32,
        "trainer.strategy.schedule must be one of ['gpipe', '1f1b', 'interleaved1f1b'], got 'interleaved'",
    ),
    (
        (2, 1, 1),
        1,
        8,
        "interleaved1f1b",
        1,
        {},
        32,
        "trainer.strategy: schedule interleaved1f1b needs stages_per_rank >= 2",
    ),
    (
        (2, 1, 1),
        1,
        8,
        "1f1b",
        2,
        {},
        32,
        "trainer.strategy: stages_per_rank > 1 needs schedule interleaved1f1b, got '1f1b'",
    ),
    ((2, 1, 1), 1, 8, "1f1b", 0, {}, 32, "trainer.strategy.stages_per_rank must be an integer >= 1, got 0"),
    ((1, 1, 0), 1, 8, "1f1b", 1, {}, 32, "trainer.strategy.tensor_parallel_size must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("dims,batch,global_batch,schedule,stages_per_rank,arch,seq_len,message", BAD_LAYOUTS)
def test_strategy_and_planner_refuse_a_layout_with_the_same_message(
    dims, batch, global_batch, schedule, stages_per_rank, arch, seq_len, message
):
    from types import SimpleNamespace

    from flm_lightning.parallel import FLMParallelStrategy
    from flm_lightning.planner import Layout, Workload, check_plan

    pp, dp, tp = dims
    model = tiny_config("teleflm", **{"n_layers": 4, **arch})
    strategy = FLMParallelStrategy(
        tensor_parallel_size=tp, pipeline_parallel_size=pp, schedule=schedule, stages_per_rank=stages_per_rank
    )
    strategy.parallel_devices, strategy.num_nodes = [torch.device("cpu")] * max(pp * dp * tp, 1), 1
    with pytest.raises(ConfigError) as by_strategy:  # what main.py fit runs before any process group
        strategy.check(model, SimpleNamespace(batch_size=batch, global_batch_size=global_batch, seq_len=seq_len))
    layout = Layout(tp=tp, pp=pp, dp=dp, micro_batch=batch, schedule=schedule, stages_per_rank=stages_per_rank)
    with pytest.raises(ConfigError) as by_planner:  # what `python -m flm_lightning plan` runs
        check_plan(model, layout, Workload(global_batch=global_batch, seq_len=seq_len))
    assert str(by_strategy.value) == str(by_planner.value) == message


def test_compare_layouts_refuses_a_bad_layout_before_forking(config, capsys):
    from flm_lightning.__main__ import main as tool_main

    with pytest.raises(SystemExit) as exit_info:
        tool_main(["compare-layouts", "-c", config, "--layouts", "1x1x1,4x1x1", "--micro-batches", "2"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: layout 4x1x1: 2 micro-batch(es) per step (data.global_batch_size / (data.batch_size x dp)) is fewer "
        "than pipeline_parallel_size=4: the pipeline would idle; raise data.global_batch_size or lower data.batch_size"
    )


def test_bad_layout_exits_2_before_any_process_group(config, capsys):
    args = [
        "fit",
        "-c",
        config,
        "--trainer.devices=1",
        "--trainer.strategy=flm_lightning.parallel.FLMParallelStrategy",
        "--trainer.strategy.init_args.tensor_parallel_size=2",
        "--trainer.logger=false",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "error: world size 1 (nodes x devices) is not divisible" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


def test_stages_split_layers_evenly_or_by_layout():
    assert stage_layers(5, 2) == [["0", "1", "2"], ["3", "4"]]
    assert stage_layers(4, 2, [1, 3]) == [["0"], ["1", "2", "3"]]


@pytest.mark.parametrize("stages_per_rank", [1, 2])
def test_pipeline_stages_hold_every_submodule_and_compute_the_model(family, stages_per_rank):
    """Split over pp = 2 ranks (no process group: the split is local), the stages hold every submodule of
    the model, the rank's own objects, and run in order they compute the model's logits. A submodule added
    to FLMTransformer without a pipeline placement stops the split instead of being silently dropped."""
    torch.manual_seed(0)
    model = FLMTransformer(tiny_config(family, n_layers=4)).eval()
    tokens = torch.randint(0, 100, (2, 9))
    stages_by_id, held = {}, set()
    for pp_rank in range(2):
        part = copy.deepcopy(model)
        ids, stages = split_for_rank(part, pp_rank, 2, stages_per_rank)
        own = {id(m) for m in part.modules()}
        for stage in stages:
            assert all(id(m) in own for m in stage.modules() if m is not stage and m is not stage.layers)
            held |= {"tok_embeddings" if name == "tied_head" else name for name, _ in stage.named_children()}
        stages_by_id.update(zip(ids, stages))
    assert held == {name for name, _ in model.named_children()}
    assert [n for s in sorted(stages_by_id) for n in stages_by_id[s].layers] == list(model.layers)
    with torch.no_grad():
        h = tokens
        for stage_id in sorted(stages_by_id):
            h = stages_by_id[stage_id](h)
        torch.testing.assert_close(h, model(tokens))
    model.extra = torch.nn.Linear(4, 4)  # a new submodule, placed nowhere
    with pytest.raises(TypeError, match="FLMTransformer.extra has no pipeline placement"):
        split_for_rank(copy.deepcopy(model), 0, 2, stages_per_rank)


def _rank_failure():
    raise RuntimeError("rank failed")


def test_a_failing_rank_fails_the_launch(tmp_path):
    with pytest.raises(Exception, match="rank failed"):
        run_forked(_rank_failure, 2, log_dir=str(tmp_path))
    # The parent stops the other rank once one fails; the first failure is in its own log.
    assert any("rank failed" in (tmp_path / f"rank{r}.log").read_text() for r in range(2))


def test_resume_from_one_process_at_a_sharded_layout(config, reference, tmp_path):
    """The other direction: saved by one process (1x1x1), resumed at dp2 x tp2."""
    folder = _save_at_step_5(config, tmp_path, "1x1x1")
    resumed = _losses(config, tmp_path / "sharded", "1x2x2", ckpt_path=str(folder))
    assert _max_diff(resumed, reference["teleflm"][5:]) < TOL


def test_tied_embedding_resumes_from_pipeline_to_one_process(config, reference, tmp_path):
    """The two copies of a tied embedding are one checkpoint entry: pp2 -> 1x1x1 continues exactly."""
    folder = _save_at_step_5(config, tmp_path, "2x1x1", FLM_101B_FAMILY)
    resumed = _losses(config, tmp_path / "one", "1x1x1", FLM_101B_FAMILY, ckpt_path=str(folder))
    assert _max_diff(resumed, reference["flm101b"][5:]) < TOL


@pytest.mark.parametrize(
    "preset,overlay",
    [
        ("conf/tiny.yaml", "conf/layouts/cpu_2x2x2.yaml"),
        ("conf/flm_101b.yaml", "conf/layouts/flm_101b_192gpu.yaml"),
        ("conf/tele_flm_52b.yaml", "conf/layouts/tele_flm_52b_896gpu.yaml"),
        ("conf/tele_flm_1t.yaml", "conf/layouts/tele_flm_1t_896gpu.yaml"),
    ],
)
def test_published_layouts_fit_their_models(preset, overlay):
    """The ready layout overlays pass the strategy's checks for their preset (no process started)."""
    from flm_lightning.cli import load_config

    config = load_config([preset, overlay])  # as `main.py fit -c PRESET -c OVERLAY` reads them
    trainer = config.values["trainer"]
    strategy = trainer["strategy"]["init_args"]
    dims = ParallelDims.infer(
        trainer["devices"] * trainer["num_nodes"],
        tp=strategy["tensor_parallel_size"],
        pp=strategy["pipeline_parallel_size"],
    )
    data = config.values["data"]["init_args"]
    micro_batches = micro_batches_per_step(data["global_batch_size"], data["batch_size"], dims.dp)
    check_layout(
        dims,
        config.arch,
        seq_len=config.seq_len,
        micro_batches=micro_batches,
        schedule=strategy["schedule"],
        stages_per_rank=strategy["stages_per_rank"],
        layout=strategy["layout"],
    )
    expected = {
        "conf/flm_101b.yaml": (4, 12, 4),
        "conf/tele_flm_52b.yaml": (2, 112, 4),
        "conf/tele_flm_1t.yaml": (28, 1, 32),
    }
    assert dims.shape == expected.get(preset, (2, 2, 2))


def _growth(ramp_steps: int) -> list[str]:
    """Width (64 -> 96, heads 4 -> 6) and depth (4 -> 6) growth at step 4."""
    stage = (
        '{"at_step": 4, "arch": {"hidden_size": 96, "n_heads": 6, "n_layers": 6}, '
        f'"ramp_steps": {ramp_steps}, "rewarmup_steps": 2}}'
    )
    return [
        f'--trainer.callbacks+={{"class_path": "flm_lightning.callbacks.GrowthCallback", '
        f'"init_args": {{"stages": [{stage}]}}}}'
    ]


@pytest.mark.parametrize("layouts,ramp_steps", [(["1x2x1", "2x1x1"], 3), (["1x1x2", "2x2x2"], 3), (["2x2x2"], 0)])
def test_growth_under_the_strategy_is_the_one_process_growth(config, tmp_path, layouts, ramp_steps):
    """Gather, grow, re-shard: FSDP, pipeline and tensor-parallel layouts train the grown model exactly as
    one process does, AdamW state carried over, through the mask ramp (masks cut per tensor-parallel
    shard, masked norm statistics on sequence-parallel slices) and without one."""
    plain = train_layout(config, layout_overrides(None, GLOBAL_BATCH, STEPS) + _growth(ramp_steps), None)["train"]
    for layout in layouts:
        assert _max_diff(_losses(config, tmp_path / layout, layout, _growth(ramp_steps)), plain) < TOL, layout


def test_resume_mid_growth_ramp_at_another_layout(config, tmp_path):
    """A checkpoint of a grown model inside its ramp (step 5 of 4..7), saved at pp2 x dp2, resumes at dp2."""
    plain = train_layout(config, layout_overrides(None, GLOBAL_BATCH, STEPS) + _growth(3), None)["train"]
    folder = _save_at_step_5(config, tmp_path, "2x2x1", _growth(3))
    resumed = _losses(config, tmp_path / "resumed", "1x2x1", _growth(3), ckpt_path=str(folder))
    assert _max_diff(resumed, plain[5:]) < TOL


def test_growth_that_does_not_fit_the_layout_stops_before_training(config, tmp_path):
    five_heads = [
        '--trainer.callbacks+={"class_path": "flm_lightning.callbacks.GrowthCallback", "init_args": '
        '{"stages": [{"at_step": 4, "arch": {"hidden_size": 80, "n_heads": 5}}]}}'
    ]
    with pytest.raises(Exception):
        _losses(config, tmp_path, "1x1x2", five_heads)
    log = (tmp_path / "1x1x2-logs" / "rank0.log").read_text()
    assert (
        "GrowthCallback stage 0: trainer.strategy.tensor_parallel_size=2 does not divide model.arch.n_heads (5)" in log
    )


def test_main_py_launches_the_layout_and_resumes_from_last(config, tmp_path):
    """The user's path: `python main.py fit` starts the ranks itself (Lightning's launcher), writes
    TensorBoard logs and checkpoint folders, and `--ckpt_path last` continues."""
    import os
    import subprocess
    import sys

    run = [
        sys.executable,
        "main.py",
        "fit",
        "-c",
        config,
        "--trainer.devices=2",
        "--trainer.use_distributed_sampler=false",
        "--trainer.strategy=flm_lightning.parallel.FLMParallelStrategy",
        "--trainer.strategy.init_args.data_parallel_size=2",
        "--data.init_args.batch_size=4",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpts'}",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_last=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=2",
        "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=1",
    ]
    # A clean environment: rendezvous variables left by earlier in-process runs would make the
    # launched ranks wait for peers that never come.
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES and not k.startswith("PL_")}
    first = subprocess.run([*run, "--trainer.max_steps=3"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "ckpts" / "last.ckpt" / ".metadata").is_file()
    second = subprocess.run(
        [*run, "--trainer.max_steps=6", "--ckpt_path=last"], capture_output=True, text=True, timeout=300, env=env
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert [(p / ".metadata").is_file() for p in (tmp_path / "ckpts").glob("*step=6.ckpt")] == [True]
    assert list(tmp_path.glob("lightning_logs/version_*/events.out.tfevents.*"))


def test_guard_rollback_under_the_strategy_matches_one_process(config, tmp_path):
    """A spike at step 8 rolled back to the step-5 checkpoint folder (loaded in place by the strategy) at
    dp2 x tp2: the run goes on exactly as the one-process rollback does."""

    def overrides(name):
        return [
            f"--trainer.callbacks+={{'class_path': 'lightning.pytorch.callbacks.ModelCheckpoint', 'init_args': "
            f"{{'dirpath': '{tmp_path / name}', 'every_n_train_steps': 5, 'save_top_k': -1}}}}",
            "--trainer.callbacks+={'class_path': 'flm_lightning.callbacks.TrainingGuard', 'init_args': "
            "{'inject_spike_at': [8], 'spike_policy': 'rollback', 'warmup_steps': 3, 'spike_min_ratio': 100}}",
            "--trainer.enable_checkpointing=true",
        ]

    base = layout_overrides(None, GLOBAL_BATCH, 12)
    one = train_layout(config, base + overrides("one"), None)["train"]
    dims = parse_layout("1x2x2")
    forked = run_layout(
        config, dims, layout_overrides(dims, GLOBAL_BATCH, 12) + overrides("sharded"), str(tmp_path), "1x2x2"
    )["train"]
    assert (tmp_path / "sharded" / "epoch=0-step=5.ckpt" / ".metadata").is_file()  # a DCP folder was rolled back to
    assert len(one) == len(forked) == 12
    assert _max_diff(one, forked) < TOL
    # The rollback happened: the steps after it differ from a run that kept the spiked update out only.
    skipped = train_layout(config, base + [o.replace("'rollback'", "'skip'") for o in overrides("skip")], None)["train"]
    assert max(abs(a - b) for a, b in zip(one[9:], skipped[9:])) > 1e-3
