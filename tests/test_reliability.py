"""Crash safety: bit-exact resume after SIGKILL, atomic checksummed checkpoints, preemption."""

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flm_lightning.checkpoint import AtomicCheckpointIO, verify
from flm_lightning.cli import main
from flm_lightning.errors import CheckpointError
from tests.conftest import TINY

GROWTH = """
    - class_path: flm_lightning.callbacks.GrowthCallback
      init_args:
        stages:
          - at_step: 10
            arch: {n_layers: 3, hidden_size: 96, n_heads: 3}
            ramp_steps: 30
"""


def _config(tmp: Path, name: str, growth: bool) -> list[str]:
    overlay = tmp / f"{name}.yaml"
    overlay.write_text(f"""
trainer:
  max_steps: 120
  log_every_n_steps: 1
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  plugins:
    - class_path: flm_lightning.checkpoint.AtomicCheckpointIO
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp}, name: {name}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp / name / "ckpt"}, every_n_train_steps: 4, save_last: true, save_top_k: 2,
                  monitor: step, mode: max}}
    - class_path: flm_lightning.callbacks.PreemptionCheckpoint
{GROWTH if growth else ""}
model:
  arch: {{n_layers: 2, hidden_size: 64, n_heads: 2, dropout: 0.1, max_seq_len: 64}}
data:
  init_args: {{seq_len: 64, batch_size: 8}}
""")
    return ["fit", "-c", TINY, "-c", str(overlay)]


def _losses(tmp: Path, name: str, version: int = 0) -> dict[int, float]:
    acc = EventAccumulator(glob.glob(str(tmp / name / f"version_{version}" / "events.out.tfevents.*"))[0])
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _start(args: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "main.py", *args, f"--data.cache_dir={cache}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(folder: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.stem.split("step=")[1].split("-")[0]) for p in folder.glob("*step=*.ckpt")]
        if steps and max(steps) >= at_least:
            return max(steps)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise TimeoutError(folder)


@pytest.mark.parametrize("growth", [False, True], ids=["plain", "mid-growth-ramp"])
def test_sigkill_then_resume_is_bit_exact(growth, docs_cache, tmp_path):
    reference = main(_config(tmp_path, "ref", growth) + [f"--data.cache_dir={docs_cache}"])
    assert reference.trainer.global_step == 120
    expected = _losses(tmp_path, "ref")

    args = _config(tmp_path, "killed", growth)
    proc = _start(args, docs_cache)
    saved = _wait_for_checkpoint(tmp_path / "killed" / "ckpt", 16, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved < 120
    last = torch.load(tmp_path / "killed" / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < last < 120  # the kill may land between the step checkpoint and last.ckpt
    main(args + [f"--data.cache_dir={docs_cache}", "--ckpt_path=last"])
    resumed = _losses(tmp_path, "killed", version=1)
    assert sorted(resumed) == list(range(last, 120))
    assert [resumed[s] for s in range(last, 120)] == [expected[s] for s in range(last, 120)]  # bit for bit
    before_kill = _losses(tmp_path, "killed", version=0)  # what reached the disk before SIGKILL
    assert all(before_kill[s] == expected[s] for s in before_kill)


def test_sigterm_saves_and_exits_cleanly(docs_cache, tmp_path):
    args = _config(tmp_path, "pre", growth=False)
    proc = _start(args + ["--trainer.max_steps=100000"], docs_cache)
    _wait_for_checkpoint(tmp_path / "pre" / "ckpt", 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    folder = tmp_path / "pre" / "ckpt"
    preempted = torch.load(folder / "last.ckpt", weights_only=True)["global_step"]
    assert preempted >= 4 and not list(folder.glob("last-v*.ckpt"))
    resumed = main(
        args + [f"--data.cache_dir={docs_cache}", "--ckpt_path=last", f"--trainer.max_steps={preempted + 2}"]
    )
    assert resumed.trainer.global_step == preempted + 2
    # The resumed run's ModelCheckpoint keeps `last.ckpt` the newest: no last-v1.ckpt beside a stale one.
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == preempted + 2
    assert not list(folder.glob("last-v*.ckpt"))


def test_atomic_checkpoint_io(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)
    assert io.load_checkpoint(path)["step"] == 1 and (tmp_path / "a.ckpt.sha256").is_file()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, tmp_path / "b.ckpt")

    # A crash in the middle of writing the next version leaves the previous one whole.
    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1

    # Corruption at rest is detected by the checksum, naming the other checkpoints.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(CheckpointError, match=r"corrupted \(checksum mismatch\).*b\.ckpt"):
        io.load_checkpoint(path)
    # A file that is not a checkpoint at all: a clear message, nothing executed.
    (tmp_path / "c.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        io.load_checkpoint(tmp_path / "c.ckpt")
    verify(tmp_path / "c.ckpt")  # no sidecar: nothing to verify


def test_validate_on_a_corrupted_checkpoint_exits_2(docs_cache, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    out = subprocess.run(
        [
            sys.executable,
            "main.py",
            "validate",
            "-c",
            "conf/tiny.yaml",
            f"--ckpt_path={bad}",
            f"--data.cache_dir={docs_cache}",
            "--trainer.logger=false",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "bad.ckpt cannot be read" in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr
    # A torn copy of a real checkpoint (no sidecar): the zip container's CRCs catch it.
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.randn(1000)}}, tmp_path / "good.ckpt")
    (tmp_path / "torn.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:3000])
    out = subprocess.run(
        [
            sys.executable,
            "main.py",
            "validate",
            "-c",
            "conf/tiny.yaml",
            f"--ckpt_path={tmp_path / 'torn.ckpt'}",
            f"--data.cache_dir={docs_cache}",
            "--trainer.logger=false",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "torn.ckpt cannot be read" in out.stderr and "good.ckpt" in out.stderr


def _accumulating(tmp: Path, name: str, steps: int = 24) -> list[str]:
    """Dropout on, 2 micro-batches of 4 per step, a checkpoint every 4 steps."""
    return _config(tmp, name, growth=False) + [
        f"--trainer.max_steps={steps}",
        "--data.init_args.batch_size=4",
        "--data.init_args.global_batch_size=8",
    ]


@pytest.mark.parametrize("micro_batch", [0, 1], ids=["first-micro-batch", "second-micro-batch"])
def test_preemption_inside_an_accumulation_window_resumes_exactly(micro_batch, docs_cache, tmp_path, monkeypatch):
    """SIGUSR1 arriving while either micro-batch of step 6 runs: the step completes, last.ckpt holds step 7's
    boundary, and the resumed run logs the uninterrupted run's losses bit for bit."""
    from flm_lightning.engine import StepEngine

    cache = [f"--data.cache_dir={docs_cache}"]
    main(_accumulating(tmp_path, "ref") + cache)
    expected = _losses(tmp_path, "ref")
    calls = {"n": 0}
    original = StepEngine.loss_parts

    def signalling(self, batch):
        if calls["n"] == 6 * 2 + micro_batch:  # training micro-batches run before it: 6 steps x 2
            signal.raise_signal(signal.SIGUSR1)
        calls["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(StepEngine, "loss_parts", signalling)
    stopped = main(_accumulating(tmp_path, "pre") + cache)
    monkeypatch.undo()
    assert stopped.trainer.global_step == 7
    folder = tmp_path / "pre" / "ckpt"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 7
    main(_accumulating(tmp_path, "pre") + cache + ["--ckpt_path=last"])
    resumed = _losses(tmp_path, "pre", version=1)
    assert sorted(resumed) == list(range(7, 24))
    assert [resumed[s] for s in range(7, 24)] == [expected[s] for s in range(7, 24)]  # bit for bit
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 24
    assert not list(folder.glob("last-v*.ckpt")) and not list(folder.glob("epoch=1*"))  # never left epoch 0


def test_kill_resume_kill_resume_is_bit_exact(docs_cache, tmp_path):
    """Two SIGKILLs at arbitrary points of an accumulating run, each followed by `--ckpt_path last`."""
    cache = [f"--data.cache_dir={docs_cache}"]
    main(_accumulating(tmp_path, "ref") + cache)
    expected = _losses(tmp_path, "ref")
    folder = tmp_path / "killed" / "ckpt"
    args = _accumulating(tmp_path, "killed")
    proc = _start(args, docs_cache)
    _wait_for_checkpoint(folder, 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = torch.load(folder / "last.ckpt", weights_only=True)["global_step"]
    proc = _start(args + ["--ckpt_path=last"], docs_cache)
    _wait_for_checkpoint(folder, first + 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    second = torch.load(folder / "last.ckpt", weights_only=True)["global_step"]
    assert first < second < 24
    main(args + cache + ["--ckpt_path=last"])
    logged = {}
    for version in range(3):
        logged.update(_losses(tmp_path, "killed", version=version))
    assert sorted(logged) == list(range(24))
    assert [logged[s] for s in range(24)] == [expected[s] for s in range(24)]  # bit for bit
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 24
    assert not list(folder.glob("epoch=1*"))
