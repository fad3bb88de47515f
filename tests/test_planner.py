import json
import subprocess
import sys
from dataclasses import replace

import pytest

from flm_lightning.cli import load_config
from flm_lightning.errors import ConfigError
from flm_lightning.planner import Hardware, Layout, Workload, check_plan, memory_per_gpu, plan_run, rank_layouts
from flm_lightning.tools.plan import load_schedule, parse_count, plan_schedule

FLM_PUBLISHED_DAYS = {"16B": 9.63, "51B": 5.37, "101B": 6.54}


@pytest.fixture(scope="module")
def flm_schedule():
    return plan_schedule(load_schedule("conf/plans/flm_101b_growth.yaml"))


def test_flm_101b_stage_days_within_15_percent(flm_schedule):
    for stage in flm_schedule["stages"]:
        assert stage["days"] == pytest.approx(FLM_PUBLISHED_DAYS[stage["name"]], rel=0.15), stage["name"]
        assert stage["fits"], stage["name"]


def test_flm_101b_growth_saves_about_72_percent(flm_schedule):
    assert flm_schedule["total"]["tokens"] == pytest.approx(311.55e9)
    assert 0.25 < flm_schedule["flops_ratio"] < 0.30  # published: 72% saving -> about 27-28%
    assert flm_schedule["time_ratio"] == pytest.approx(21.0 / 76.0, abs=0.03)  # 21 days vs 76 from scratch


@pytest.fixture(scope="module")
def flm101b():
    return load_config(["conf/flm_101b.yaml"]).arch


def test_published_layouts_fit(flm101b):
    hw = Hardware(gpu_memory_gb=80)
    wl = Workload(global_batch=2304, seq_len=2048)
    for arch, layout in [
        (replace(flm101b, hidden_size=4096, n_heads=32, ffn_hidden_size=16384), Layout(tp=2, pp=1, dp=96)),
        (replace(flm101b, hidden_size=7168, n_heads=56, ffn_hidden_size=28672), Layout(tp=4, pp=2, dp=24)),
        (flm101b, Layout(tp=4, pp=4, dp=12)),
    ]:
        assert plan_run(arch, layout, wl, hw).fits, layout
    tele = load_config(["conf/tele_flm_52b.yaml"]).arch
    assert plan_run(tele, Layout(tp=4, pp=2, dp=112), Workload(global_batch=1344, seq_len=4096), hw).fits


def test_101b_on_one_card_does_not_fit(flm101b):
    plan = plan_run(flm101b, Layout(sharding="ddp"), Workload(global_batch=1, seq_len=2048), Hardware(gpu_memory_gb=80))
    assert not plan.fits and plan.memory.total > 18 * 101e9  # 18 bytes per parameter in bf16 + AdamW


def test_state_bytes_per_parameter(flm101b):
    tiny = replace(flm101b, n_layers=2, hidden_size=256, n_heads=2, ffn_hidden_size=1024, vocab_size=1000)
    wl32 = Workload(global_batch=8, seq_len=128, precision="fp32")
    m = memory_per_gpu(tiny, Layout(sharding="ddp"), wl32, Hardware(overhead_gb=0))
    params = 2 * (12 * 256 * 256 + 13 * 256) + 1024 * 256 + 2 * 256
    assert (m.parameters, m.gradients, m.optimizer) == (4 * params, 4 * params, 8 * params)
    wl16 = replace(wl32, precision="bf16")
    ddp = memory_per_gpu(tiny, Layout(sharding="ddp", dp=8), wl16, Hardware())
    zero1 = memory_per_gpu(tiny, Layout(sharding="distributed-optimizer", dp=8), wl16, Hardware())
    assert ddp.parameters + ddp.gradients + ddp.optimizer == 18 * params
    assert zero1.optimizer == pytest.approx(12 * params / 8)


def test_activation_levers(flm101b):
    wl = Workload(global_batch=64, seq_len=2048)
    hw = Hardware()
    base = memory_per_gpu(flm101b, Layout(tp=8, pp=8, dp=1), wl, hw).activations
    assert memory_per_gpu(flm101b, Layout(tp=8, pp=8, dp=1, recompute="full"), wl, hw).activations < base / 5
    assert memory_per_gpu(
        flm101b, Layout(tp=4, pp=8, dp=2), Workload(global_batch=64, seq_len=2048), hw
    ).activations == pytest.approx(2 * base)
    gpipe = memory_per_gpu(flm101b, Layout(tp=8, pp=8, dp=1, schedule="gpipe"), wl, hw).activations
    assert gpipe == pytest.approx(base * 64 / 8)  # all micro-batches in flight instead of pp
    no_flash = memory_per_gpu(flm101b, Layout(tp=8, pp=8, dp=1), replace(wl, flash=False), hw).activations
    assert no_flash > base


@pytest.mark.parametrize(
    "layout, workload, message",
    [
        (Layout(tp=3), Workload(8, 2048), r"tensor_parallel_size=3 does not divide model.arch.n_heads \(80\)"),
        (Layout(pp=81), Workload(81, 2048), r"81 pipeline stages .* but only 80 layers"),
        (Layout(pp=4, dp=2), Workload(7, 2048), r"data.global_batch_size=7 is not a multiple of data.batch_size x "),
        (Layout(pp=4, dp=2), Workload(4, 2048), r"2 micro-batch\(es\) per step .* fewer than pipeline_parallel_size=4"),
        (Layout(recompute="some"), Workload(8, 2048), "recompute must be one of"),
        (Layout(sharding="zero9"), Workload(8, 2048), "sharding must be one of"),
        (Layout(micro_batch=0), Workload(8, 2048), "data.batch_size .* must be a positive integer"),
        (Layout(), Workload(8, 2048, precision="fp8"), "precision must be one of"),
    ],
)
def test_bad_layouts(flm101b, layout, workload, message):
    with pytest.raises(ConfigError, match=message):
        check_plan(flm101b, layout, workload)


def test_ranking_lists_fitting_layouts_fastest_first(flm101b):
    plans = rank_layouts(flm101b, 192, Workload(global_batch=2160, seq_len=2048, tokens=26.54e9), Hardware(), {})
    assert plans and all(p.fits for p in plans)
    assert [p.seconds for p in plans] == sorted(p.seconds for p in plans)
    assert all(p.layout.gpus == 192 for p in plans)
    fixed = rank_layouts(flm101b, 192, Workload(global_batch=2160, seq_len=2048), Hardware(), {"tp": 4, "pp": 4})
    assert {(p.layout.tp, p.layout.pp) for p in fixed} == {(4, 4)}


def test_parse_count():
    assert parse_count("245.37B", "t") == pytest.approx(245.37e9)
    assert parse_count("2.5e12", "t") == 2.5e12 and parse_count(7, "t") == 7.0
    with pytest.raises(ConfigError, match="not a number"):
        parse_count("lots", "tokens")


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "flm_lightning", "plan", *args], capture_output=True, text=True)


def test_plan_cli_schedule_json():
    out = _plan("--schedule", "conf/plans/flm_101b_growth.yaml", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [s["name"] for s in result["stages"]] == ["16B", "51B", "101B"]


def test_plan_cli_single_layout_table():
    out = _plan(
        "-c",
        "conf/flm_101b.yaml",
        "--gpus",
        "192",
        "--tp",
        "4",
        "--pp",
        "4",
        "--global-batch",
        "2160",
        "--tokens",
        "26.54B",
        "--achieved-tflops",
        "165",
    )
    assert out.returncode == 0, out.stderr
    assert "fits" in out.stdout and "TP4 PP4 DP12" in out.stdout and "6.1" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["-c", "conf/flm_101b.yaml", "--gpus", "192", "--tp", "3", "--pp", "1"],
            "error: trainer.strategy.tensor_parallel_size=3 does not divide model.arch.n_heads (80)",
        ),
        (
            [
                "-c",
                "conf/flm_101b.yaml",
                "--gpus",
                "192",
                "--tp",
                "4",
                "--pp",
                "4",
                "--global-batch",
                "2160",
                "--pp-schedule",
                "interleaved1f1b",
            ],
            "error: trainer.strategy: schedule interleaved1f1b needs stages_per_rank >= 2",
        ),
        (
            ["-c", "conf/flm_101b.yaml", "--gpus", "192", "--tp", "4", "--pp", "4", "--global-batch", "1024"],
            "error: data.global_batch_size=1024 is not a multiple of data.batch_size x data-parallel ranks = 1 x 12",
        ),
        (["-c", "conf/flm_101b.yaml", "--gpus", "0"], "--gpus must be a positive integer"),
        (["-c", "conf/flm_101b.yaml", "--gpus", "8", "--tokens", "many"], "not a number"),
        (["--gpus", "8"], "either -c CONFIG or --schedule"),
    ],
)
def test_plan_cli_bad_input_exits_2(args, message):
    out = _plan(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_planned_memory_matches_a_measured_cpu_run(tmp_path):
    """Peak RSS of real fp32 training steps against the planner, within 20% (benchmarks/memory_check.py)."""
    out_file = tmp_path / "mem.json"
    subprocess.run(
        [sys.executable, "benchmarks/memory_check.py", "--case", "small", "--steps", "2", "--json", str(out_file)],
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads(out_file.read_text())[0]
    assert row["measured_bytes"] > 100 * 2**20
    assert row["ratio"] == pytest.approx(1.0, abs=0.2)
