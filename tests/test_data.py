"""The data pipeline: prepare, shards, mixtures, teacher samples, document masks, exact resume."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from flm_lightning.data import MixtureDataModule, SourceSpec, TeacherSpec, TextDataModule, prepare
from flm_lightning.data.corpus import python_docs
from flm_lightning.data.mixture import ResumableSampler, blend, document_masks
from flm_lightning.data.shards import PreparedCorpus
from flm_lightning.errors import ConfigError, DataError
from tests.conftest import TINY

LABELS = ("\U0001f608", "\U0001f621")
EN = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 8 for i in range(60)]
ZH = [f"第{i}段：北京市是中国的首都，长城很长。" * 10 for i in range(60)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    (root / "en").mkdir()
    with open(root / "en" / "part.jsonl", "w") as f:
        for text in EN[:40]:
            f.write(json.dumps({"text": text}) + "\n")
    for i, text in enumerate(EN[40:]):
        (root / "en" / f"doc{i:02d}.txt").write_text(text)
    pq.write_table(pa.table({"content": ZH}), root / "zh.parquet")
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    # One tokenizer for both domains, trained on both.
    (raw / "both").mkdir(exist_ok=True)
    for i, text in enumerate(EN + ZH):
        (raw / "both" / f"{i:03d}.txt").write_text(text)
    prepare([str(raw / "both")], str(out / "tok"), vocab_size=600, special_tokens=LABELS, progress=False)
    tokenizer = str(out / "tok" / "tokenizer.json")
    prepare([str(raw / "en")], str(out / "en"), tokenizer=tokenizer, domain="en", val_fraction=0.1, progress=False)
    prepare(
        [str(raw / "zh.parquet")],
        str(out / "zh"),
        tokenizer=tokenizer,
        domain="zh",
        text_field="content",
        val_fraction=0.1,
        workers=2,
        shard_tokens=2000,
        progress=False,
    )
    return out


def _documents(corpus: PreparedCorpus, split: str, tok: Tokenizer) -> list[str]:
    eod = corpus.manifest["eod_id"]
    docs = []
    for shard in corpus.splits[split]:
        start = 0
        for end in shard.doc_ends:
            ids = shard.tokens[start:end].tolist()
            assert ids[-1] == eod
            docs.append(tok.decode(ids[:-1]))
            start = end
    return docs


def test_prepare_round_trip(prepared):
    tok = Tokenizer.from_file(str(prepared / "tok" / "tokenizer.json"))
    for name, texts in (("en", EN), ("zh", ZH)):
        corpus = PreparedCorpus(prepared / name, verify_checksums=True)
        m = corpus.manifest
        assert m["documents"] == 60 and m["domain"] == name and m["dtype"] == "<u2"
        got = _documents(corpus, "train", tok) + _documents(corpus, "val", tok)
        assert sorted(got) == sorted(texts)  # every document once, decoded exactly
        assert m["splits"]["val"]["documents"] > 0
        assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert len(PreparedCorpus(prepared / "zh").splits["train"]) > 1  # several shards
    assert tok.token_to_id(LABELS[0]) is not None


def test_interrupted_or_damaged_output_never_loads(prepared, raw, tmp_path):
    out = tmp_path / "x"
    partial = tmp_path / "x.partial"
    partial.mkdir()
    (partial / "junk.bin").write_bytes(b"123")
    with pytest.raises(DataError, match="interrupted prepare"):
        PreparedCorpus(out)
    prepare([str(raw / "en")], str(out), tokenizer=str(prepared / "tok" / "tokenizer.json"), progress=False)
    assert not partial.exists() and PreparedCorpus(out).manifest["documents"] == 60
    shard = out / "train" / "00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(DataError, match="truncated"):
        PreparedCorpus(out)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    PreparedCorpus(out)  # sizes match ...
    with pytest.raises(DataError, match="checksum"):
        PreparedCorpus(out, verify_checksums=True)  # ... the content does not
    with pytest.raises(DataError, match="already prepared"):
        prepare([str(raw / "en")], str(out), vocab_size=300, progress=False)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare([str(tmp_path / "missing")], str(tmp_path / "o"), vocab_size=300, progress=False)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        prepare([str(tmp_path / "empty.txt")], str(tmp_path / "o"), vocab_size=300, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
        prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), vocab_size=300, progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "mixed.txt").write_bytes(b"valid text here\n\xff\xfe broken\nmore valid text\n")
    manifest = prepare([str(tmp_path / "mixed.txt")], str(tmp_path / "ok"), vocab_size=300, progress=False)
    assert manifest["invalid_utf8_lines"] == 1 and manifest["documents"] == 1
    with pytest.raises(DataError, match="exactly one of"):
        prepare([str(tmp_path / "mixed.txt")], str(tmp_path / "o"), progress=False)


def test_tokenizer_mismatch_between_sources(prepared, raw, tmp_path):
    prepare([str(raw / "en")], str(tmp_path / "other"), vocab_size=400, progress=False)
    dm = MixtureDataModule(
        sources=[SourceSpec(str(prepared / "en")), SourceSpec(str(tmp_path / "other"), name="o")], seq_len=16
    )
    with pytest.raises(DataError, match="different tokenizer"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "sources, message",
    [
        ([{"path": "x", "weight": -1.0}], "weight must be >= 0"),
        ([{"path": "x", "weight": 0.0}], "weights are all zero"),
        ([{"path": "x", "epochs": 0.0}], "epochs > 0"),
    ],
)
def test_bad_mixture_settings(sources, message):
    with pytest.raises(ConfigError, match=message):
        MixtureDataModule(sources=sources)


def test_blend_proportions_and_caps():
    weights = [0.7521, 0.0981, 0.0717, 0.0287, 0.0494]  # the shape of Tele-FLM's table
    source, rank = blend(weights, [None] * 5, 10_000)
    w = np.asarray(weights) / sum(weights)
    for prefix in (100, 1000, 10_000):
        counts = np.bincount(source[:prefix], minlength=5)
        assert np.all(np.abs(counts - w * prefix) <= 1.0)  # within one sample at every prefix
    for s in range(5):
        assert rank[source == s].tolist() == list(range((source == s).sum()))
    source, _ = blend([0.5, 0.5], [10, None], 100)  # the capped source drops out, the other fills in
    assert np.bincount(source).tolist() == [10, 90]
    with pytest.raises(DataError, match="raise the sources' epochs"):
        blend([1, 1], [5, 5], 20)


def test_document_masks():
    ids = torch.tensor([5, 6, 0, 7, 8, 9, 0, 4])  # 0 ends a document
    out = document_masks(ids, eod=0)
    assert out["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    mask = out["attention_mask"][0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[2, :3].all() and not mask[3, 2]


def test_teacher_samples_and_masks(prepared, tmp_path):
    records = [
        {"text": "2 plus 2.", "proposition": "The sum is 4.", "label": True},
        {"text": "2 plus 2.", "proposition": "The sum is 5.", "label": False},
        {"prompt": "Say hi.", "response": "hi there"},
    ] * 10
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    dm = MixtureDataModule(
        sources=[SourceSpec(str(prepared / "en"))],
        seq_len=32,
        batch_size=8,
        teacher=TeacherSpec(str(tmp_path / "t.jsonl"), ratio=0.25, val_fraction=0.0),
    )
    dm.setup("fit")
    tok = dm.tokenizer
    true_id, false_id = tok.token_to_id(LABELS[0]), tok.token_to_id(LABELS[1])
    seen = {"judgement": 0, "instruction": 0}
    for sample in dm.teacher_train:
        trained = sample["loss_mask"].nonzero().flatten().tolist()
        targets = sample["labels"][trained].tolist()
        if targets[-1] in (true_id, false_id):
            seen["judgement"] += 1
            assert len(trained) == 1  # the label token only
        else:
            seen["instruction"] += 1
            response = tok.encode("hi there", add_special_tokens=False).ids + [dm.eod]
            assert targets == response  # the prompt is masked
    assert seen["judgement"] == 20 and seen["instruction"] == 10
    # Mixed into every batch at the ratio.
    dl = dm.train_dataloader()
    batches = [b for _, b in zip(range(6), dl)]
    assert [int(b["is_teacher"].sum()) for b in batches] == [2] * 6


def test_label_token_must_be_one_token(prepared, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "a", "proposition": "b", "label": True}))
    dm = MixtureDataModule(
        sources=[SourceSpec(str(prepared / "en"))],
        seq_len=16,
        teacher=TeacherSpec(str(tmp_path / "t.jsonl"), true_token="verdict-yes"),
    )
    with pytest.raises(DataError, match="--special-tokens"):
        dm.setup("fit")


def _stream(dm, start, world, steps):
    dataset = dm.train_dataloader().dataset
    rows = []
    for rank in range(world):
        sampler = ResumableSampler(start, len(dataset), dm.batch_size, rank, world)
        rows.append(list(sampler)[: steps * dm.batch_size])
    # Interleave back into the global order: per step, rank 0's rows, then rank 1's ...
    merged = []
    for step in range(steps):
        for rank in range(world):
            merged += rows[rank][step * dm.batch_size : (step + 1) * dm.batch_size]
    return [dataset[i]["input_ids"] for i in merged]


class _FakeTrainer:
    max_steps, world_size, global_rank, accumulate_grad_batches = 50, 1, 0, 1


def test_exact_resume_of_the_data_order(prepared):
    def module():
        dm = MixtureDataModule(
            sources=[SourceSpec(str(prepared / "en"), 0.6), SourceSpec(str(prepared / "zh"), 0.4)],
            seq_len=16,
            batch_size=4,
            seed=7,
        )
        dm.trainer = _FakeTrainer()
        dm.setup("fit")
        return dm

    full = _stream(module(), 0, 1, 12)
    resumed = module()
    resumed.load_state_dict({"consumed_samples": 5 * 4})  # as saved after 5 steps
    tail = _stream(resumed, resumed.consumed_samples, 1, 7)
    assert all(torch.equal(a, b) for a, b in zip(full[20:], tail)) and len(tail) == 28
    # Two data-parallel ranks of batch 2 read the same global order.
    two = module()
    two.batch_size = 2
    split = _stream(two, 0, 2, 12)
    assert all(torch.equal(a, b) for a, b in zip(full[:48], split))


def test_text_datamodule_runs_the_default_corpus_through_prepare(docs_cache):
    dm = TextDataModule(cache_dir=str(docs_cache), seq_len=64, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    manifest = PreparedCorpus(dm.cache_path).manifest
    assert manifest["format"] == "flm-shards-v1" and manifest["documents"] > 400
    assert manifest["splits"]["train"]["bytes"] > 1_500_000
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_builtin_corpus_is_real_text():
    docs = list(python_docs())
    assert len(docs) > 400 and sum(map(len, docs)) > 1_500_000
    assert any('The "if" statement' in d for d in docs)


def test_prepare_cli(raw, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flm_lightning",
            "prepare",
            "--input",
            str(raw / "en"),
            "--output",
            str(tmp_path / "p"),
            "--vocab-size",
            "300",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "60 documents" in out.stdout and (tmp_path / "p" / "manifest.json").is_file()
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "flm_lightning",
            "prepare",
            "--input",
            str(raw / "en"),
            "--output",
            str(tmp_path / "p"),
            "--vocab-size",
            "300",
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already prepared" in again.stderr


def test_two_domain_mixture_through_the_cli(prepared, tmp_path):
    """main.py fit on a two-domain mixture with teacher data: per-domain curves in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flm_lightning.cli import main

    records = [
        {"text": f"{a} plus {b}.", "proposition": f"The sum is {a + b + (i % 2)}.", "label": i % 2 == 0}
        for i, (a, b) in enumerate((i % 7, i % 5) for i in range(40))
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "mix.yaml").write_text(f"""
data:
  class_path: flm_lightning.data.MixtureDataModule
  init_args:
    sources:
      - {{path: {prepared / "en"}, weight: 0.6}}
      - {{path: {prepared / "zh"}, weight: 0.4, epochs: 50}}
    teacher: {{path: {tmp_path / "t.jsonl"}, ratio: 0.25}}
    seq_len: 32
    batch_size: 8
    reset_at_document_boundaries: true
model:
  arch: {{vocab_size: 640, max_seq_len: 32}}
""")
    args = [
        "fit",
        "-c",
        TINY,
        "-c",
        str(tmp_path / "mix.yaml"),
        "--trainer.max_steps=12",
        "--trainer.val_check_interval=6",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=2",
    ]
    main(args)
    acc = EventAccumulator(next((tmp_path / "tiny").glob("version_0/events.out.tfevents.*")).as_posix())
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val/en/loss", "val/en/bpb", "val/zh/loss", "val/zh/bpb", "val/teacher_acc", "train/teacher_loss"} <= tags
    en = acc.Scalars("val/en/loss")[-1].value
    bytes_per_token = PreparedCorpus(prepared / "en").bytes_per_token("val")
    assert acc.Scalars("val/en/bpb")[-1].value == pytest.approx(en / (np.log(2) * bytes_per_token), rel=1e-4)
    # Token ids beyond the model's vocabulary: one clear error, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        main(args[:4] + ["--model.arch.vocab_size=300", "--trainer.logger=false"])
    assert exit_info.value.code == 2


def test_resumed_fit_sees_the_same_batches_and_losses(docs_cache, tmp_path):
    """Kill-free version of the resume check: a run resumed from its step-6 checkpoint logs,
    step for step, exactly the training losses of the run that went on (data order, model,
    optimizer and schedule all restored)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flm_lightning.cli import main

    def run(name, *extra):
        main(
            [
                "fit",
                "-c",
                TINY,
                f"--data.cache_dir={docs_cache}",
                "--data.seq_len=32",
                "--data.batch_size=4",
                "--model.arch.n_layers=2",
                "--trainer.max_steps=12",
                "--trainer.limit_val_batches=0",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--trainer.logger.init_args.name={name}",
                "--trainer.log_every_n_steps=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                "--trainer.callbacks.every_n_train_steps=6",
                "--trainer.callbacks.save_top_k=-1",
                *extra,
            ]
        )
        acc = EventAccumulator(next((tmp_path / name).glob("version_*/events.out.tfevents.*")).as_posix())
        acc.Reload()
        return {e.step: e.value for e in acc.Scalars("train/loss")}

    full = run("full")
    ckpt = next((tmp_path / "full").glob("checkpoints/*step=6.ckpt"))
    resumed = run("resumed", f"--ckpt_path={ckpt}")
    assert sorted(resumed) == list(range(6, 12))
    assert [resumed[s] for s in range(6, 12)] == [full[s] for s in range(6, 12)]  # bit for bit
