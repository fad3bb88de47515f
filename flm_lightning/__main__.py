"""`python -m flm_lightning <tool>`: command-line tools that reuse the trainer's builders.

Only the chosen tool's module is imported (and with it torch): `--help` and a wrong tool name answer
without loading any heavy library.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flm_lightning.console import quiet_third_party, show_project_logs
from flm_lightning.errors import EXIT_USAGE, USER_ERRORS

# name: (module in flm_lightning.tools, the first line of its docstring); a test keeps the two in step.
TOOLS = {
    "info": ("info", "`python -m flm_lightning info -c CONFIG [--json]`: parameters and training FLOPs per token."),
    "plan": ("plan", "`python -m flm_lightning plan`: per-GPU memory, FLOPs and time of a run or a growth schedule."),
    "prepare": (
        "prepare",
        "`python -m flm_lightning prepare --input PATH... --output DIR`: tokenise text into training shards.",
    ),
    "grow": (
        "grow",
        "`python -m flm_lightning grow --ckpt IN --config TARGET.yaml --out OUT`: offline growth between stages.",
    ),
    "export-hf": (
        "export_hf",
        "`python -m flm_lightning export-hf --ckpt CKPT --out DIR [--format F]`: a Hugging Face model directory.",
    ),
    "import-hf": (
        "import_hf",
        "`python -m flm_lightning import-hf --model DIR --out CKPT`: a Llama, Tele-FLM or FLM model into this trainer.",
    ),
    "generate": (
        "generate",
        '`python -m flm_lightning generate --ckpt CKPT --prompt "..."`: text from a checkpoint (KV cache).',
    ),
    "compare-layouts": (
        "compare_layouts",
        "`python -m flm_lightning compare-layouts -c CONFIG --layouts 1x1x1,1x2x1,1x1x2,2x1x1 --steps 10`:",
    ),
    "consolidate": (
        "consolidate",
        "`python -m flm_lightning consolidate --ckpt FOLDER --out FILE`: one weights file "
        "from a distributed checkpoint.",
    ),
    "bench": (
        "bench",
        "`python -m flm_lightning bench -c CONFIG`: the trainer's throughput against a hand-written loop.",
    ),
    "coord-check": (
        "coord_check",
        "`python -m flm_lightning coord-check -c CONFIG --widths 64,128,256,512`: μP vs SP activation scales.",
    ),
    "predict-loss": (
        "predict_loss",
        "`python -m flm_lightning predict-loss`: fit L(N) = a * N^b + c over finished runs, predict a target.",
    ),
}


def load_tool(name: str):
    return importlib.import_module(f"flm_lightning.tools.{TOOLS[name][0]}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m flm_lightning", allow_abbrev=False)
    sub = parser.add_subparsers(dest="tool", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, line) in TOOLS.items():
        tool_parser = sub.add_parser(name, help=line, allow_abbrev=False)
        if name == chosen:
            load_tool(name).add_arguments(tool_parser)
    args = parser.parse_args(argv)
    show_project_logs()
    quiet_third_party()
    try:
        load_tool(args.tool).run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
