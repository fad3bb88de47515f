"""Hugging Face interop: export to `from_pretrained` directories and import Llama checkpoints."""
