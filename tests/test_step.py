"""The one training step: token-exact accumulation in every layout, step-true logs.

Batches mix language rows (every token trained), FreeLM judgement rows (one label token),
instruction rows (the response only) and document resets, so rows carry very different numbers of
trained tokens: a step normalised per micro-batch instead of per step would differ measurably.
"""

import glob
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flm_lightning.cli import main
from flm_lightning.data import MixtureDataModule, TextDataModule
from flm_lightning.data.mixture import SourceSpec, TeacherSpec
from flm_lightning.engine import StepEngine, split_micro_batches
from flm_lightning.errors import ConfigError
from flm_lightning.model import FLMTransformer
from flm_lightning.parallel.dims import ParallelDims
from flm_lightning.tools.compare_layouts import run_layout
from tests.conftest import tiny_config

RECORDS = [
    {"text": f"{a} plus {b} is", "proposition": f"the sum {a + b + (a % 2)}", "label": a % 2 == 0}
    for a, b in zip(range(12), range(5, 17))
] + [{"prompt": f"Name the number {a}.", "response": f"It is {a}."} for a in range(6)]


@pytest.fixture(scope="module")
def corpus(docs_cache, tmp_path_factory) -> dict:
    """python-docs prepared with a 512 BPE, plus a teacher file (judgement and instruction records)."""
    text = TextDataModule(vocab_size=512, cache_dir=str(docs_cache))
    text.prepare_data()
    folder = tmp_path_factory.mktemp("teacher")
    (folder / "t.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    return {"path": str(text.cache_path), "teacher": str(folder / "t.jsonl")}


def _datamodule(corpus, batch_size, reset=True, ratio=0.25, global_batch_size=None) -> MixtureDataModule:
    dm = MixtureDataModule(
        sources=[SourceSpec(corpus["path"])],
        seq_len=32,
        batch_size=batch_size,
        global_batch_size=global_batch_size,
        reset_at_document_boundaries=reset,
        teacher=TeacherSpec(corpus["teacher"], ratio=ratio, true_token="Y", false_token="N", val_fraction=0.0),
    )
    dm.setup("fit")
    return dm


def _grads(model: FLMTransformer, batch: dict, micro_batches: int) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    stats = StepEngine(model, micro_batches=micro_batches).train_step(batch, lambda loss: loss.backward())
    return float(stats.loss), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_accumulated_gradients_equal_the_whole_batch(corpus):
    """Batch 8 in one piece, as 2 x 4 and as 4 x 2 micro-batches: same loss and gradient to fp32 round-off."""
    dm = _datamodule(corpus, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    tokens = batch["loss_mask"].sum(dim=1)
    assert batch["is_teacher"].sum() == 2 and tokens.min() <= 2 < 20 < tokens.max()  # very uneven rows
    assert "attention_mask" in batch  # document resets
    torch.manual_seed(0)
    model = FLMTransformer(tiny_config("teleflm", vocab_size=512, max_seq_len=32))
    loss, whole = _grads(model, batch, 1)
    for k in (2, 4):
        loss_k, grads_k = _grads(model, batch, k)
        assert abs(loss_k - loss) < 1e-6
        assert (grads_k - whole).norm() / whole.norm() < 1e-6
    # What averaging micro-batch means (Lightning's automatic accumulation) gives instead: measurably off.
    model.zero_grad(set_to_none=True)
    for micro in split_micro_batches(batch, 2):
        (StepEngine(model).loss_parts(micro).loss / 2).backward()
    mean_of_means = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (mean_of_means - whole).norm() / whole.norm() > 1e-3


def test_split_refuses_uneven_micro_batches():
    batch = {"input_ids": torch.zeros(6, 4, dtype=torch.long)}
    with pytest.raises(ConfigError, match="6 samples does not split into 4"):
        split_micro_batches(batch, 4)


def test_global_batch_size_sets_the_micro_batches(corpus):
    dm = _datamodule(corpus, batch_size=2, global_batch_size=8)
    assert dm.micro_batches == 4 and dm.global_batch() == 8
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (8, 32)  # one step's rows
    with pytest.raises(ConfigError, match="global_batch_size=10 is not a multiple of data.batch_size"):
        _datamodule(corpus, batch_size=4, global_batch_size=10).micro_batches


CONFIG = """\
seed_everything: 1234
trainer:
  accelerator: cpu
  gradient_clip_val: 1.0
  max_steps: {steps}
  log_every_n_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {logs}, name: run, default_hp_metric: false}}
model:
  arch: {{vocab_size: 512, n_layers: 4, n_heads: 4, hidden_size: 64, max_seq_len: 32}}
  optim: {{lr: 3.0e-3, warmup_steps: 2}}
data:
  class_path: flm_lightning.data.MixtureDataModule
  init_args:
    sources: [{{path: {path}}}]
    teacher: {{path: {teacher}, ratio: {ratio}, true_token: "Y", false_token: "N", val_fraction: 0.0}}
    seq_len: 32
    batch_size: 8
    reset_at_document_boundaries: {reset}
"""


def _config(corpus, tmp_path, name, steps=4, ratio=0.25, reset=True) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(steps=steps, logs=tmp_path / name, ratio=ratio, reset=str(reset).lower(), **corpus))
    return str(path)


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(glob.glob(str(folder / "run" / "version_0" / "events.out.tfevents.*"))[0])
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_trainer_accumulation_logs_the_steps_values(corpus, tmp_path):
    """One process: batch 8 vs 2 and 4 micro-batches per step log the same per-step loss, gradient norm,
    language and teacher losses; a step without teacher tokens logs no teacher loss."""
    runs = {}
    for name, extra in (
        ("whole", []),
        ("k2", ["--data.init_args.batch_size=4"]),
        ("k4", ["--data.init_args.batch_size=2"]),
    ):
        main(["fit", "-c", _config(corpus, tmp_path, name), "--data.init_args.global_batch_size=8", *extra])
        runs[name] = _scalars(tmp_path / name)
    whole = runs["whole"]
    assert sorted(whole["train/loss"]) == [0, 1, 2, 3]
    for name in ("k2", "k4"):
        for tag in ("train/loss", "train/grad_norm", "train/lm_loss", "train/teacher_loss"):
            assert runs[name][tag].keys() == whole[tag].keys()
            for step, value in whole[tag].items():
                assert runs[name][tag][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, tag, step)
    # Teacher rows are one of 16 samples: some steps of 2 x 8 samples have none, and log no teacher values.
    sparse = tmp_path / "sparse"
    main(
        [
            "fit",
            "-c",
            _config(corpus, tmp_path, "sparse", steps=8, ratio=0.0625),
            "--data.init_args.batch_size=2",
            "--data.init_args.global_batch_size=4",
        ]
    )
    logged = _scalars(sparse)
    teacher_steps = set(logged["train/teacher_loss"])
    assert 0 < len(teacher_steps) < 8 and set(logged["train/lm_loss"]) == set(range(8))
    assert set(logged["train/teacher_acc"]) == teacher_steps


def test_accumulate_grad_batches_is_refused_with_the_replacement(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", _config(corpus, tmp_path, "acc"), "--trainer.accumulate_grad_batches=2"])
    assert exit_info.value.code == 2
    assert "set data.init_args.global_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("layout,batch_size", [("1x2x1", 2), ("2x1x1", 2)], ids=["dp2", "pp2"])
def test_parallel_accumulation_matches_one_process(corpus, tmp_path, layout, batch_size):
    """dp2 and pp2 with micro-batches (global 8: 2 x 2 per dp rank; 4 pipeline micro-batches of 2) train
    exactly the one-process whole-batch steps (pipelines refuse document masks: resets off)."""
    config = _config(corpus, tmp_path, "ref", steps=4, reset=False)
    main(["fit", "-c", config, "--data.init_args.global_batch_size=8"])
    reference = _scalars(tmp_path / "ref")["train/loss"]
    pp, dp, tp = (int(x) for x in layout.split("x"))
    dims = ParallelDims.infer(pp * dp * tp, tp=tp, pp=pp)
    extra = [
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=flm_lightning.tools.compare_layouts.LossRecorder",
        f"--trainer.devices={dims.world_size}",
        "--trainer.strategy=flm_lightning.parallel.FLMParallelStrategy",
        f"--trainer.strategy.init_args.pipeline_parallel_size={pp}",
        "--trainer.use_distributed_sampler=false",
        f"--data.init_args.batch_size={batch_size}",
        "--data.init_args.global_batch_size=8",
    ]
    losses = run_layout(config, dims, extra, str(tmp_path), layout.replace("x", "_"))["train"]
    assert len(losses) == 4
    assert max(abs(a - reference[s]) for s, a in enumerate(losses)) < 1e-5
