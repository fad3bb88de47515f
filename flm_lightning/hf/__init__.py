"""Hugging Face interop: export to `from_pretrained` directories and import Llama / Tele-FLM checkpoints.

Light on purpose (no torch): the tools read `EXPORT_FORMATS` for their `--help`."""

EXPORT_FORMATS = ("auto", "llama", "teleflm", "flm")
