"""Conversion between the trainer's checkpoints and Hugging Face model directories.

- Tele-FLM family (RMSNorm, SwiGLU, no bias, RoPE): a standard Llama directory that
  `AutoModelForCausalLM.from_pretrained` loads without remote code. The input multiplier is
  folded into the embedding and output_mult / width_mult into the head.
- Every other configuration (FLM-101B: LayerNorm, GeLU, biases, xPos, tied): model_type
  "flm" with the project's own modeling file (`remote/`), loaded with `trust_remote_code=True`.

Exports are safetensors only and hold the real vocabulary (padding rows dropped); imports
pad it again. Our rotary layout is Llama's rotate-half layout, so q/k need no permutation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from flm_lightning.checkpoint import (
    arch_from_checkpoint,
    load_checkpoint,
    model_weights,
    save_weights_checkpoint,
    tokenizer_json,
)
from flm_lightning.data.tokenizer import EOD_TOKEN
from flm_lightning.errors import CheckpointError, ConfigError
from flm_lightning.model import ModelConfig

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_flm.py", "modeling_flm.py")

# Our names -> Llama names, per layer ({i}) and global.
LLAMA_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
LLAMA_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def is_llama_compatible(arch: ModelConfig) -> bool:
    logit_scale = arch.output_mult / arch.width_mult
    foldable = not arch.tie_embeddings or (arch.input_mult == 1.0 and logit_scale == 1.0)
    return arch.norm == "rmsnorm" and arch.activation == "swiglu" and arch.position == "rope" and not arch.bias and foldable


def to_llama_names(weights: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        if name in LLAMA_GLOBAL_NAMES:
            out[LLAMA_GLOBAL_NAMES[name]] = tensor
            continue
        _, idx, rest = name.split(".", 2)  # layers.{i}.rest
        out[f"model.layers.{idx}.{LLAMA_LAYER_NAMES[rest]}"] = tensor
    return out


def from_llama_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse_layer = {v: k for k, v in LLAMA_LAYER_NAMES.items()}
    inverse_global = {v: k for k, v in LLAMA_GLOBAL_NAMES.items()}
    out = {}
    for name, tensor in tensors.items():
        if name in inverse_global:
            out[inverse_global[name]] = tensor
            continue
        parts = name.split(".", 3)  # model.layers.{i}.rest
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in inverse_layer:
            raise CheckpointError(f"unexpected tensor {name!r} in a Llama checkpoint")
        out[f"layers.{parts[2]}.{inverse_layer[parts[3]]}"] = tensor
    return out


# ---- export -------------------------------------------------------------------------------
def export_hf(ckpt_path: str, out: str, tokenizer_path: Optional[str] = None, force: bool = False) -> str:
    """Write a Hugging Face directory for a checkpoint; returns "llama" or "flm"."""
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose another directory or pass --force")
    ckpt = load_checkpoint(ckpt_path)
    arch = arch_from_checkpoint(ckpt, ckpt_path)
    weights = {k: v.float() for k, v in model_weights(ckpt).items()}
    tok_text = Path(tokenizer_path).read_text(encoding="utf-8") if tokenizer_path else tokenizer_json(ckpt)
    if tok_text is None:
        raise CheckpointError(f"{ckpt_path} carries no tokenizer; pass --tokenizer tokenizer.json")

    vocab = arch.vocab_size
    weights["tok_embeddings.weight"] = weights["tok_embeddings.weight"][:vocab]
    if "output.weight" in weights:
        weights["output.weight"] = weights["output.weight"][:vocab]
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if is_llama_compatible(arch):
        family = "llama"
        config = _fold_multipliers_and_describe_llama(arch, weights)
        tensors = to_llama_names(weights, arch.n_layers)
    else:
        family = "flm"
        config = _describe_flm(arch)
        tensors = weights
        for name in REMOTE_FILES:
            shutil.copy(REMOTE_DIR / name, staging / name)
    eod = _save_tokenizer(tok_text, staging)
    config.update(eos_token_id=eod, bos_token_id=None, torch_dtype="float32")
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    (staging / "generation_config.json").write_text(json.dumps({"eos_token_id": eod, "do_sample": False}, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "model.safetensors", metadata={"format": "pt"})
    if out_dir.exists():
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    staging.rename(out_dir)
    return family


def _fold_multipliers_and_describe_llama(arch: ModelConfig, weights: dict[str, torch.Tensor]) -> dict:
    if arch.input_mult != 1.0:
        weights["tok_embeddings.weight"] = weights["tok_embeddings.weight"] * arch.input_mult
    logit_scale = arch.output_mult / arch.width_mult
    if logit_scale != 1.0:
        weights["output.weight"] = weights["output.weight"] * logit_scale
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_size,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "num_key_value_heads": arch.n_heads,
        "head_dim": arch.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        "max_position_embeddings": arch.max_seq_len,
        "tie_word_embeddings": arch.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": arch.init_std,
    }


def _describe_flm(arch: ModelConfig) -> dict:
    return {
        "architectures": ["FLMForCausalLM"],
        "model_type": "flm",
        "auto_map": {
            "AutoConfig": "configuration_flm.FLMConfig",
            "AutoModelForCausalLM": "modeling_flm.FLMForCausalLM",
        },
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "head_dim": arch.head_size,
        "intermediate_size": arch.ffn_size,
        "norm": arch.norm,
        "norm_eps": arch.norm_eps,
        "activation": arch.activation,
        "bias": arch.bias,
        "position": arch.position,
        "rope_theta": arch.rope_theta,
        "xpos_scale_base": arch.xpos_scale_base,
        "xpos_center": arch.max_seq_len // 2,
        "tie_embeddings": arch.tie_embeddings,
        "input_mult": arch.input_mult,
        "logit_scale": arch.output_mult / arch.width_mult,
        "max_position_embeddings": arch.max_seq_len,
        "tie_word_embeddings": False,
    }


def _save_tokenizer(tok_text: str, out_dir: Path) -> Optional[int]:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tok_text)
    has_eod = tok.token_to_id(EOD_TOKEN) is not None
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD_TOKEN if has_eod else None)
    hf_tok.save_pretrained(out_dir)
    return tok.token_to_id(EOD_TOKEN) if has_eod else None


# ---- import -------------------------------------------------------------------------------
def _scaled_rope(v) -> bool:
    return isinstance(v, dict) and v.get("rope_type", v.get("type", "default")) != "default"


UNSUPPORTED_LLAMA = {
    "rope_scaling": _scaled_rope,
    "rope_parameters": _scaled_rope,
    "attention_bias": bool,
    "mlp_bias": bool,
    "hidden_act": lambda v: v != "silu",
    "sliding_window": lambda v: v is not None,
}


def import_hf(model_dir: str, out: str, force: bool = False) -> ModelConfig:
    """A Llama (or this project's "flm") directory -> a weights-only checkpoint of this trainer."""
    src = Path(model_dir)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{src} has no config.json: not a Hugging Face model directory")
    out_path = Path(out)
    if out_path.exists() and not force:
        raise ConfigError(f"--out {out_path} exists; choose another path or pass --force")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e.msg})") from None
    model_type = config.get("model_type")
    if model_type not in ("llama", "flm"):
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not supported (llama or flm)")
    try:  # the config first: unsupported features are reported before any weight is read
        arch = _llama_arch(config) if model_type == "llama" else _flm_arch(config)
    except KeyError as e:
        raise CheckpointError(f"{config_file} lacks the field {e.args[0]!r}") from None
    tensors = _load_safetensors(src)
    weights = from_llama_names(tensors) if model_type == "llama" else tensors
    padded = arch.padded_vocab_size
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in weights and weights[name].shape[0] < padded:
            pad = weights[name].new_zeros(padded - weights[name].shape[0], weights[name].shape[1])
            weights[name] = torch.cat([weights[name], pad])
    from flm_lightning.model import FLMTransformer

    expected = {k: v.shape for k, v in FLMTransformer(arch).state_dict().items()}
    if set(expected) != set(weights) or any(expected[k] != weights[k].shape for k in expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        raise CheckpointError(f"{src}: tensors do not match its config (missing {missing}, unexpected {extra})")
    tok_file = src / "tokenizer.json"
    tok_text = tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None
    save_weights_checkpoint(out_path, arch, weights, tok_text)
    return arch


def _load_safetensors(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{src} has no model.safetensors (pickled .bin weights are refused: they can run code)")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            tensors.update(load_file(src / shard))
        except Exception as e:  # the library raises its own error type for a damaged file
            raise CheckpointError(f"{src / shard} is not a readable safetensors file ({e})") from None
    return {k: v.float() for k, v in tensors.items()}


def _llama_arch(config: dict) -> ModelConfig:
    problems = [k for k, bad in UNSUPPORTED_LLAMA.items() if k in config and bad(config[k])]
    heads = config["num_attention_heads"]
    if config.get("num_key_value_heads", heads) != heads:
        problems.append(f"num_key_value_heads={config['num_key_value_heads']} (grouped-query attention)")
    if problems:
        raise CheckpointError(f"this Llama config uses features the trainer does not support: {', '.join(problems)}")
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=config["vocab_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        hidden_size=config["hidden_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        ffn_hidden_size=config["intermediate_size"],
        norm="rmsnorm",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        activation="swiglu",
        bias=False,
        position="rope",
        rope_theta=float(rope_theta),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=config.get("max_position_embeddings", 2048),
        init_std=float(config.get("initializer_range", 0.02)),
    )


def _flm_arch(config: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=config["vocab_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        hidden_size=config["hidden_size"],
        head_dim=config["head_dim"],
        ffn_hidden_size=config["intermediate_size"],
        norm=config["norm"],
        norm_eps=float(config["norm_eps"]),
        activation=config["activation"],
        bias=bool(config["bias"]),
        position=config["position"],
        rope_theta=float(config["rope_theta"]),
        xpos_scale_base=float(config["xpos_scale_base"]),
        tie_embeddings=bool(config["tie_embeddings"]),
        input_mult=float(config["input_mult"]),
        output_mult=float(config["logit_scale"]),
        max_seq_len=config["max_position_embeddings"],
    )
