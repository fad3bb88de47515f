"""`python -m flm_lightning <tool>`: command-line tools that reuse the trainer's builders."""

from __future__ import annotations

import argparse
import sys

from flm_lightning.cli import show_project_logs
from flm_lightning.errors import EXIT_USAGE, USER_ERRORS
from flm_lightning.tools import (
    bench, compare_layouts, consolidate, coord_check, export_hf, generate, grow, import_hf, info, plan, predict_loss,
    prepare,
)

TOOLS = {
    "info": info,
    "plan": plan,
    "prepare": prepare,
    "grow": grow,
    "export-hf": export_hf,
    "import-hf": import_hf,
    "generate": generate,
    "compare-layouts": compare_layouts,
    "consolidate": consolidate,
    "bench": bench,
    "coord-check": coord_check,
    "predict-loss": predict_loss,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flm_lightning")
    sub = parser.add_subparsers(dest="tool", required=True)
    for name, tool in TOOLS.items():
        tool.add_arguments(sub.add_parser(name, help=(tool.__doc__ or "").splitlines()[0]))
    args = parser.parse_args(argv)
    show_project_logs()
    try:
        TOOLS[args.tool].run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
