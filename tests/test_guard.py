"""TrainingGuard: non-finite updates skipped, repeated ones stop the run, spikes handled by policy."""

import pytest
import torch
from flm_lightning.callbacks import TrainingGuard

from flm_lightning.cli import main
from tests.conftest import TINY


def _run(tmp_path, docs_cache, guard: str, steps: int = 40):
    overlay = tmp_path / "guard.yaml"
    overlay.write_text(f"""
trainer:
  max_steps: {steps}
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path / "ckpt"}, every_n_train_steps: 10, save_top_k: -1}}
    - class_path: flm_lightning.callbacks.TrainingGuard
      init_args: {guard}
model:
  arch: {{n_layers: 2, hidden_size: 64, n_heads: 2, max_seq_len: 32}}
data:
  init_args: {{seq_len: 32, batch_size: 4, cache_dir: {docs_cache}}}
""")
    return main(["fit", "-c", TINY, "-c", str(overlay)])


def _adam_step(cli) -> int:
    opt = cli.trainer.optimizers[0]
    return int(opt.state[cli.model.model.tok_embeddings.weight]["step"])


def _guard(cli) -> TrainingGuard:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, TrainingGuard))


def test_injected_nan_is_skipped(tmp_path, docs_cache):
    cli = _run(tmp_path, docs_cache, "{inject_nonfinite_at: [7]}")
    assert cli.trainer.global_step == 40
    assert _guard(cli).nonfinite_total == 1
    assert _adam_step(cli) == 39  # the optimizer never saw step 7
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_repeated_nonfinite_stops_with_the_last_good_state(tmp_path, docs_cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, docs_cache, "{inject_nonfinite_at: [12, 13, 14], max_consecutive_nonfinite: 3}")
    assert exit_info.value.code == 3
    assert "3 consecutive non-finite steps" in capsys.readouterr().err
    state = torch.load(tmp_path / "ckpt" / "guard_stop.ckpt", weights_only=True)
    assert state["global_step"] == 14
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


@pytest.mark.parametrize("policy, adam_steps, rollbacks", [("log", 40, 0), ("skip", 39, 0), ("rollback", 39, 1)])
def test_spike_policies(policy, adam_steps, rollbacks, tmp_path, docs_cache):
    cli = _run(
        tmp_path,
        docs_cache,
        f"{{inject_spike_at: [25], spike_policy: {policy}, warmup_steps: 10, spike_min_ratio: 100}}",
    )
    guard = _guard(cli)
    assert guard.rollbacks == rollbacks
    # With "log" the spiked update is applied and its aftermath may be flagged too.
    assert guard.spikes_total >= 1 if policy == "log" else guard.spikes_total == 1
    if policy == "rollback":  # AdamW state came back from the step-20 checkpoint
        assert _adam_step(cli) == 20 + (40 - 26)
    else:
        assert _adam_step(cli) == adam_steps
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


class _Module:
    def __init__(self):
        self.logged = {}

    def log(self, name, value):
        self.logged[name] = value


def test_rising_gradient_norm_is_flagged():
    guard = TrainingGuard(trend_window=10, trend_ratio=2.0)
    module = _Module()
    for step in range(20):
        guard._watch_trend(module, 1.0 + 0.01 * step)
    assert not guard.rising_flagged
    guard = TrainingGuard(trend_window=10, trend_ratio=2.0)
    for step in range(20):
        guard._watch_trend(module, 1.0 * 1.15**step)
    assert guard.rising_flagged and module.logged["guard/grad_norm_rising"] == 1.0


def test_callbacks_read_the_module_through_a_protocol():
    """FLMLightningModule gives what the callbacks read (flm_lightning.protocols.TrainedModule); the module
    imports no callback, and neither reaches into Lightning's private attributes."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from flm_lightning.module import FLMLightningModule
    from flm_lightning.protocols import TrainedModule
    from tests.conftest import tiny_config

    assert isinstance(FLMLightningModule(arch=tiny_config("teleflm")), TrainedModule)
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, flm_lightning.module; "
            "print(sorted(m for m in sys.modules if m.startswith('flm_lightning.callbacks')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"
    root = Path(__file__).resolve().parents[1]
    private = re.compile(r"\._trainer\b|\._device_mesh\b|PL_GLOBAL_SEED|\._optimizer\b")
    hits = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("flm_lightning", "callbacks")
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if private.search(line)
    ]
    assert hits == []
