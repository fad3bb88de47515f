import json

import numpy as np
import pytest
import torch

from flm_lightning.data import PackedTokens, TextDataModule
from flm_lightning.data.corpus import read_documents
from flm_lightning.errors import ConfigError, DataError

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT + f" Ends {i}.\n")
    return folder


def test_packed_windows_are_shifted_and_contiguous():
    tokens = np.arange(23, dtype=np.uint16)
    ds = PackedTokens(tokens, seq_len=5)
    assert len(ds) == 4  # (23 - 1) // 5
    first, second = ds[0], ds[1]
    assert first["input_ids"].tolist() == [0, 1, 2, 3, 4]
    assert first["labels"].tolist() == [1, 2, 3, 4, 5]
    assert second["input_ids"][0].item() == 5 and first["loss_mask"].sum().item() == 5
    assert first["input_ids"].dtype == torch.int64


def test_prepare_splits_by_document_and_caches(corpus_dir, tmp_path):
    dm = TextDataModule(corpus=str(corpus_dir), vocab_size=300, seq_len=16, batch_size=4, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    dm.prepare_data()
    dm.setup("fit")
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    assert meta["documents"] == {"train": 18, "val": 2}
    eod = meta["eod_id"]
    train = np.fromfile(dm.cache_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(dm.cache_path / "val.bin", dtype=np.uint16)
    assert (train == eod).sum() == 18 and (val == eod).sum() == 2 and val[-1] == eod
    assert dm.tokenizer_vocab_size <= 300
    # The tokenizer round-trips the text.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dm.tokenizer_file))
    sample = "Document 3. The quick brown fox"
    assert tok.decode(tok.encode(sample).ids) == sample
    # A second preparation reuses the cache untouched.
    stamp = (dm.cache_path / "train.bin").stat().st_mtime_ns
    TextDataModule(corpus=str(corpus_dir), vocab_size=300, seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path / "c")).prepare_data()
    assert (dm.cache_path / "train.bin").stat().st_mtime_ns == stamp
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_train_order_is_seeded(corpus_dir, tmp_path):
    def first_batch(seed):
        dm = TextDataModule(corpus=str(corpus_dir), vocab_size=300, seq_len=8, batch_size=4, seed=seed, cache_dir=str(tmp_path / str(seed)))
        dm.prepare_data()
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(1), first_batch(1))


def test_truncated_cache_is_reported(corpus_dir, tmp_path):
    dm = TextDataModule(corpus=str(corpus_dir), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "c"))
    dm.prepare_data()
    path = dm.cache_path / "train.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        TextDataModule(corpus=str(corpus_dir), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "c")).setup("fit")


def test_bad_corpus_inputs(tmp_path):
    with pytest.raises(DataError, match="no text files"):
        read_documents(str(tmp_path / "missing"))
    (tmp_path / "bad.txt").write_bytes(b"ok\xff\xfe broken")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_documents(str(tmp_path / "bad.txt"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        read_documents(str(tmp_path / "empty"))


@pytest.mark.parametrize("kwargs, field", [(dict(seq_len=0), "seq_len"), (dict(vocab_size=100), "vocab_size"), (dict(val_fraction=1.5), "val_fraction")])
def test_bad_data_settings(kwargs, field):
    with pytest.raises(ConfigError, match=rf"data\.{field}"):
        TextDataModule(**kwargs)


def test_builtin_corpus_is_real_text():
    docs = read_documents("python-docs")
    assert len(docs) > 400
    assert sum(map(len, docs)) > 1_500_000
    assert any("The \"if\" statement" in d for d in docs)
