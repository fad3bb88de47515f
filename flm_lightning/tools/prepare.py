"""`python -m flm_lightning prepare --input PATH... --output DIR`: tokenise text into training shards.

--input      files, folders or globs of .txt (one document per file), .jsonl (one per line,
             --text-field) and .parquet (one per row)
--tokenizer  an existing tokenizer.json, or --vocab-size N to train a byte-level BPE on the input
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or globs")
    parser.add_argument("--output", required=True, help="the prepared directory to create")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--tokenizer", help="tokenizer.json to use")
    group.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the input")
    parser.add_argument("--domain", default="default", help="domain name used in logs (default 'default')")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="documents held out (default 0.01)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 64M)")
    parser.add_argument(
        "--special-tokens", nargs="*", default=[], help="extra single tokens, e.g. FreeLM's label tokens"
    )
    parser.add_argument("--force", action="store_true", help="prepare again over an existing output")


def run(args: argparse.Namespace) -> None:
    # Imported here: `--help` and argument errors answer without loading torch.
    from flm_lightning.data.prepare import prepare

    manifest = prepare(
        args.input,
        args.output,
        text_field=args.text_field,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        domain=args.domain,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        special_tokens=tuple(args.special_tokens),
        force=args.force,
    )
    splits = manifest["splits"]
    print(
        f"{args.output}: {manifest['documents']:,} documents, {splits['train']['tokens']:,} train and "
        f"{splits['val']['tokens']:,} validation tokens in {len(splits['train']['shards'])} + "
        f"{len(splits['val']['shards'])} shards, {manifest['seconds']:.1f} s"
    )
    if manifest["invalid_utf8_lines"]:
        print(f"warning: skipped {manifest['invalid_utf8_lines']:,} lines that are not valid UTF-8")
