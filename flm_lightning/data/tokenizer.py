"""Tokenizers from the Hugging Face `tokenizers` library: load a tokenizer.json or train a byte-level BPE."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flm_lightning.errors import DataError

EOD_TOKEN = "<|endoftext|>"


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, extra_special_tokens: Iterable[str] = ()) -> Tokenizer:
    """A GPT-2 style byte-level BPE (the kind Tele-FLM trained) with `EOD_TOKEN` as id 0.

    `extra_special_tokens` (e.g. FreeLM's two label tokens) become single, never-split tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.tokenizer: {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise DataError(f"data.tokenizer: {path} is not a valid tokenizer.json ({e})") from None


def eod_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(EOD_TOKEN)
    if token_id is None:
        raise DataError(f"data.tokenizer: the tokenizer has no end-of-document token {EOD_TOKEN!r}")
    return token_id
