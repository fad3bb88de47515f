"""benchmarks/gpu_check.sh (the one prepared GPU run of issue 18) on CPU: its plumbing, and the
pieces it relies on (compile backend variable, a checkout without pip install, the 1x1x1 overlay)."""

import csv
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SELECTED = "parity sdpa_compiled fit_fsdp2"
NO_EDITABLE = (
    "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
)


def _probe_wheel(folder: Path) -> None:
    """A tiny wheel of a distribution nobody has, and a (dummy) one of a distribution that is installed."""
    with zipfile.ZipFile(folder / "gpu_check_probe-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("gpu_check_probe/__init__.py", "VALUE = 1\n")
        info = "gpu_check_probe-0.1.dist-info"
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu_check_probe\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    (folder / "PyYAML-0.0.1-py3-none-any.whl").write_bytes(b"never opened: PyYAML is installed")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, docs_cache):
    """One CPU smoke run of the script with a few stages selected (the others are recorded as not selected)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    wheels = tmp / "wheels"
    wheels.mkdir()
    _probe_wheel(wheels)
    # As on the GPU machine, the project is not installed: the editable install's finder is removed
    # at start-up, so only what the script puts on PYTHONPATH can import flm_lightning.
    bare = tmp / "bare"
    bare.mkdir()
    (bare / "sitecustomize.py").write_text(NO_EDITABLE)
    env = {
        **os.environ,
        "PYTHONPATH": str(bare),
        "GPU_CHECK_DRY_RUN": "1",
        "GPU_CHECK_ONLY": SELECTED,
        "GPU_CHECK_WHEELS": str(wheels),
        "GPU_CHECK_SITE": str(tmp / "site"),
        "GPU_CHECK_CACHE_DIR": str(docs_cache),
        "GPU_CHECK_SCRATCH": str(tmp / "scratch"),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, tmp


def _stages(out: Path) -> dict[str, list[str]]:
    with open(out / "stages.tsv", newline="") as f:
        return {row[0]: row[1:] for row in csv.reader(f, delimiter="\t")}


def test_cpu_smoke_run_writes_every_part_under_one_folder(dry_run):
    done, tmp = dry_run
    out = tmp / "out"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = _stages(out)
    assert all(len(fields) == 4 for fields in stages.values())
    for name in ("env", *SELECTED.split()):
        assert stages[name][0] == "ok", (name, (out / "logs" / f"{name}.log").read_text()[-3000:])
    assert stages["sdpa_eager"][:1] == ["skipped"] and "not in GPU_CHECK_ONLY" in stages["sdpa_eager"][3]
    # Wheels: only the distribution this Python lacks is installed, an installed one is kept.
    assert (tmp / "site" / "gpu_check_probe" / "__init__.py").is_file()
    assert "keep    pyyaml" in (out / "logs" / "wheels.log").read_text()
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] and env["device"] == "cpu" and env["requirement_problems"] == []
    bench = json.loads((out / "bench" / "sdpa_compiled.json").read_text())
    assert bench["overrides"][-1] == "model.compile=true" and bench["median_ratio"] > 0
    assert list((out / "fit_fsdp2").glob("**/events.out.tfevents.*")), "the fit logs to TensorBoard under OUT"
    summary = (out / "summary.md").read_text()
    for part in (
        "## Stages",
        "## Attention backends",
        "## Attention parity",
        "## Throughput",
        "| sdpa_compiled |",
        "FLMParallelStrategy 1x1x1",
        "| fit_fsdp2 | 2 |",
        "CPU dry run",
    ):
        assert part in summary, part
    assert summary in done.stdout  # printed at the end too


def test_cpu_smoke_run_says_which_backends_cannot_run_and_why(dry_run):
    done, tmp = dry_run
    out = tmp / "out"
    stages = _stages(out)
    assert stages["sdpa_cudnn_eager"][0] == "skipped" and "No viable backend" in stages["sdpa_cudnn_eager"][3]
    if "flash_eager" in stages:  # flash-attn / Transformer Engine are not installed on the CPU test machine
        assert "cannot import flash_attn" in stages["flash_eager"][3] and "source archive" in stages["flash_eager"][3]
    if "te_eager" in stages:
        assert "cannot import transformer_engine.pytorch" in stages["te_eager"][3]
    backends = {line.split("\t")[0]: line.split("\t")[1:] for line in (out / "backends.tsv").read_text().splitlines()}
    assert backends["sdpa"][0] == "yes" and backends["fa4"][0] == "no"
    parity = json.loads((out / "parity.json").read_text())
    rows = {(r["backend"], r["position"]): r for r in parity["rows"]}
    assert parity["dtype"] == "bfloat16" and rows[("sdpa", "rope")]["max_abs_out"] < 0.05
    assert rows[("bfloat16 rounding", "rope")]["max_abs_out"] > 0  # the floor a bf16 kernel is judged against
    assert "skipped" in rows[("sdpa[cudnn]", "rope")]
    summary = (out / "summary.md").read_text()
    assert "| sdpa_cudnn | **no** |" in summary


def test_compiled_bench_does_not_recompile(dry_run):
    """The hand-written loop autocasts as Lightning's bf16-mixed does (cache_enabled=False): no block is
    compiled again for the loop."""
    _, tmp = dry_run
    log = (tmp / "out" / "logs" / "sdpa_compiled.log").read_text()
    assert "Recompiling function" not in log, [line for line in log.splitlines() if "__recompiles" in line]


def test_compile_backend_comes_from_the_environment(monkeypatch, caplog):
    from flm_lightning.model import FLMTransformer
    from flm_lightning.parallel.compute import apply_compile
    from tests.conftest import tiny_config

    model = FLMTransformer(tiny_config("teleflm"))
    monkeypatch.setenv("FLM_COMPILE_BACKEND", "aot_eager")
    with caplog.at_level(logging.INFO, logger="flm_lightning.parallel.compute"):
        apply_compile(model)
        apply_compile(model, backend="eager")
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile (aot_eager) on 2 blocks",
        "torch.compile (eager) on 2 blocks",
    ]


def test_a_checkout_without_pip_install_finds_the_callbacks():
    """The GPU machine runs the project from its folder, not installed: flm_lightning.callbacks must still import."""
    code = NO_EDITABLE + "import flm_lightning.callbacks as c\nprint(c.__file__)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == REPO / "callbacks" / "__init__.py"


def test_cuda_layout_overlay_is_one_process_fsdp2_with_bf16_params():
    from flm_lightning.cli import load_config
    from flm_lightning.parallel.dims import ParallelDims, check_layout

    config = load_config(["conf/bench_1b.yaml", "conf/layouts/cuda_1x1x1.yaml"])
    trainer = config.values["trainer"]
    strategy = trainer["strategy"]["init_args"]
    assert trainer["accelerator"] == "gpu" and trainer["use_distributed_sampler"] is False
    assert (strategy["param_dtype"], strategy["reduce_dtype"]) == ("bfloat16", "float32")
    dims = ParallelDims.infer(
        trainer["devices"], tp=strategy["tensor_parallel_size"], pp=strategy["pipeline_parallel_size"]
    )
    check_layout(dims, config.arch, seq_len=config.seq_len)
    assert dims.shape == (1, 1, 1)
