"""Conversion between the trainer's checkpoints and Hugging Face model directories.

Three formats (see docs/huggingface.md for the table):
- "llama" (Tele-FLM family: RMSNorm, SwiGLU, no bias, RoPE): a standard Llama directory that
  `AutoModelForCausalLM.from_pretrained` loads without remote code. The input multiplier is
  folded into the embedding and output_mult / width_mult into the head (the μP identity is lost).
- "teleflm" (same family): the format of the Tele-FLM releases: Llama tensor names, weights as
  trained, `model_type: TeleFLM` and the μP keys use_mup, input_mult, output_mult,
  mup_scale_factor in config.json. With use_mup the embeddings are multiplied by input_mult and
  the logits by output_mult / mup_scale_factor; the trainer computes the same with
  mup_scale_factor = hidden_size / base_hidden_size, so both directions are bit-exact.
- "flm" (every configuration, FLM-101B style included: LayerNorm, GeLU, biases, xPos, tied):
  the project's own modeling file (`remote/`), loaded with `trust_remote_code=True`.

Exports are safetensors only and hold the real vocabulary (padding rows dropped); imports pad it
again with zeros. Imports read safetensors or weights-only `.bin` files, single or sharded, and
refuse any config.json key they do not understand. Our rotary layout is Llama's rotate-half
layout, so q/k need no permutation.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

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
from flm_lightning.hf import EXPORT_FORMATS
from flm_lightning.model import ModelConfig

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = {
    "flm": ("configuration_flm.py", "modeling_flm.py"),
    "teleflm": ("configuration_teleflm.py", "modeling_teleflm.py"),
}
TELEFLM_TYPE = "TeleFLM"
MUP_KEYS = ("use_mup", "input_mult", "output_mult", "mup_scale_factor")

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
LLAMA_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROTARY_BUFFER = "self_attn.rotary_emb.inv_freq"  # saved by transformers < 4.31 in .bin files


def is_llama_family(arch: ModelConfig) -> bool:
    """RMSNorm, SwiGLU, RoPE, no biases: the networks Llama's (and Tele-FLM's) modeling code computes."""
    return arch.norm == "rmsnorm" and arch.activation == "swiglu" and arch.position == "rope" and not arch.bias


def is_llama_compatible(arch: ModelConfig) -> bool:
    """A Llama family network whose multipliers can be folded into the weights (the head is untied,
    or there is nothing to fold)."""
    foldable = not arch.tie_embeddings or (arch.input_mult == 1.0 and arch.logit_scale == 1.0)
    return is_llama_family(arch) and foldable


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
def export_hf(
    ckpt_path: str, out: str, tokenizer_path: Optional[str] = None, force: bool = False, format: str = "auto"
) -> str:
    """Write a Hugging Face directory for a checkpoint of this trainer.

    format: "auto" (Llama when the network is one, else flm), "llama", "teleflm" or "flm".
    Returns the format written. Raises ConfigError for a busy `out` or a format the network does not
    fit (e.g. teleflm for a LayerNorm model), CheckpointError for an unreadable checkpoint.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose another directory or pass --force")
    ckpt = load_checkpoint(ckpt_path)
    arch = arch_from_checkpoint(ckpt, ckpt_path)
    family = format if format != "auto" else ("llama" if is_llama_compatible(arch) else "flm")
    if family == "teleflm" and not is_llama_family(arch):
        raise ConfigError(
            f"--format teleflm needs RMSNorm, SwiGLU, RoPE and no biases; {ckpt_path} has "
            f"norm={arch.norm} activation={arch.activation} position={arch.position} bias={arch.bias} "
            f"(use --format flm)"
        )
    if family == "llama" and not is_llama_compatible(arch):
        raise ConfigError(
            f"--format llama cannot hold {ckpt_path}: it needs RMSNorm, SwiGLU, RoPE, no biases and an "
            f"untied head if there are multipliers to fold (use --format teleflm or flm)"
        )
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
    if family == "llama":
        config = _fold_multipliers(arch, weights)
        tensors = to_llama_names(weights, arch.n_layers)
    elif family == "teleflm":
        config = _describe_teleflm(arch)
        tensors = to_llama_names(weights, arch.n_layers)
    else:
        config = _describe_flm(arch)
        tensors = weights
    for name in REMOTE_FILES.get(family, ()):
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


def _fold_multipliers(arch: ModelConfig, weights: dict[str, torch.Tensor]) -> dict:
    """Plain Llama: input_mult into the embedding, output_mult / width_mult into the (untied) head."""
    if arch.input_mult != 1.0:
        weights["tok_embeddings.weight"] = weights["tok_embeddings.weight"] * arch.input_mult
    if arch.logit_scale != 1.0:
        weights["output.weight"] = weights["output.weight"] * arch.logit_scale
    return _describe_llama(arch)


def _describe_llama(arch: ModelConfig) -> dict:
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


def _describe_teleflm(arch: ModelConfig) -> dict:
    """Llama keys plus the four μP keys; use_mup is false only when every multiplier is neutral."""
    use_mup = arch.input_mult != 1.0 or arch.output_mult != 1.0 or arch.base_hidden_size is not None
    config = _describe_llama(arch)
    config.update(
        architectures=["TeleFLMForCausalLM"],
        model_type=TELEFLM_TYPE,
        auto_map={
            "AutoConfig": "configuration_teleflm.TeleFLMConfig",
            "AutoModelForCausalLM": "modeling_teleflm.TeleFLMForCausalLM",
        },
        use_mup=use_mup,
        input_mult=arch.input_mult,
        output_mult=arch.output_mult,
        mup_scale_factor=arch.width_mult,
    )
    return config


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
        "tie_embeddings": arch.tie_embeddings,
        "input_mult": arch.input_mult,
        "logit_scale": arch.logit_scale,
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
# config.json keys that do not change what the weights compute: metadata, generation defaults,
# output switches, training-only dropout, and pretraining_tp (Llama's split matmul, same result).
INERT_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "pretraining_tp",
        "attention_dropout",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "is_encoder_decoder",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "initializer_range",
    }
)
# Llama keys the converter reads (the architecture) or checks (features with one supported value).
LLAMA_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "max_position_embeddings",
        "tie_word_embeddings",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
    }
)
# Keys of this project's own flm export (xpos_center: the fixed centre of older exports; it cancels in every score).
FLM_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "intermediate_size",
        "norm",
        "norm_eps",
        "activation",
        "bias",
        "position",
        "rope_theta",
        "xpos_scale_base",
        "xpos_center",
        "tie_embeddings",
        "input_mult",
        "logit_scale",
        "max_position_embeddings",
        "tie_word_embeddings",
    }
)
MODEL_TYPES = {"llama": LLAMA_KEYS, TELEFLM_TYPE: LLAMA_KEYS | set(MUP_KEYS), "flm": FLM_KEYS}
SUPPORTED_TYPES = (
    "llama (Llama tensor names), TeleFLM (Llama names + use_mup/input_mult/output_mult/"
    "mup_scale_factor), flm (this project's export)"
)
WEIGHT_LAYOUTS = (
    "model.safetensors",
    "model.safetensors.index.json + shards",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json + shards",
)


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
    """A Llama, TeleFLM or flm directory -> a weights-only checkpoint of this trainer (fp32, vocabulary
    padded with zero rows). Returns the imported architecture.

    The config is checked before any weight is read: an unknown model_type, a config key the converter
    does not understand, a feature the trainer lacks or μP keys it cannot honour raise CheckpointError
    naming them, so a different model is never written. Weights: see WEIGHT_LAYOUTS; `.bin` files are
    read with weights-only loading and refused if they need code execution.
    """
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
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.lower() == TELEFLM_TYPE.lower():
        model_type = TELEFLM_TYPE
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not supported; supported layouts: {SUPPORTED_TYPES}"
        )
    _check_keys(config, model_type, config_file)
    try:  # the config first: unsupported features are reported before any weight is read
        if model_type == "flm":
            arch = _flm_arch(config)
        else:
            arch = _llama_arch(config)
            arch = _teleflm_mup(config, arch, config_file) if model_type == TELEFLM_TYPE else arch
    except KeyError as e:
        raise CheckpointError(f"{config_file} lacks the field {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{config_file} describes a model the trainer cannot build: {e}") from None
    tensors = _load_weights(src)
    if model_type == "flm":
        weights = tensors
    else:
        weights = from_llama_names(_drop_rotary_buffers(tensors, arch, src))
    padded = arch.padded_vocab_size
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in weights and weights[name].shape[0] < padded:
            pad = weights[name].new_zeros(padded - weights[name].shape[0], weights[name].shape[1])
            weights[name] = torch.cat([weights[name], pad])
    from flm_lightning.model import FLMTransformer

    with torch.device("meta"):
        expected = {k: v.shape for k, v in FLMTransformer(arch).state_dict().items()}
    if set(expected) != set(weights) or any(expected[k] != weights[k].shape for k in expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        shapes = [
            f"{k} {tuple(weights[k].shape)} != {tuple(expected[k])}"
            for k in sorted(set(expected) & set(weights))
            if expected[k] != weights[k].shape
        ][:2]
        raise CheckpointError(
            f"{src}: tensors do not match its config (missing {missing}, unexpected {extra}, wrong shapes {shapes})"
        )
    tok_file = src / "tokenizer.json"
    tok_text = tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None
    save_weights_checkpoint(out_path, arch, weights, tok_text)
    return arch


def _check_keys(config: dict, model_type: str, config_file: Path) -> None:
    """Refuse any key this model_type does not define: it might change what the weights compute."""
    known = MODEL_TYPES[model_type] | INERT_KEYS
    unknown = [k for k in config if k not in known]
    if not unknown:
        return
    key = unknown[0]
    if model_type == "llama" and key in MUP_KEYS:
        raise CheckpointError(
            f"{config_file}: key {key!r} = {config[key]!r} has no meaning for model_type 'llama' "
            f"(Llama has no μP multipliers); for a Tele-FLM release set model_type to 'TeleFLM'"
        )
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:4])})" if len(unknown) > 1 else ""
    raise CheckpointError(
        f"{config_file}: key {key!r} = {config[key]!r} is not understood for model_type "
        f"{model_type!r}{more}; refusing rather than risk importing a different model"
    )


def _load_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory in one of WEIGHT_LAYOUTS (safetensors preferred), as fp32."""
    layouts: tuple[tuple[str, str, Callable[[Path], dict[str, torch.Tensor]]], ...] = (
        ("model.safetensors.index.json", "model.safetensors", _read_safetensors),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", _read_bin),
    )
    for index_name, single, reader in layouts:
        index = src / index_name
        if index.is_file():
            return {k: v.float() for k, v in _read_sharded(index, reader).items()}
        if (src / single).is_file():
            return {k: v.float() for k, v in reader(src / single).items()}
    suffixes = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
    found = sorted(p.name for p in src.iterdir() if p.suffix in suffixes)
    raise CheckpointError(
        f"{src} holds no weights in a supported layout ({'; '.join(WEIGHT_LAYOUTS)}); "
        f"found {found or 'no weight files'}"
    )


def _read_sharded(index: Path, reader: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index} is not a shard index (a JSON object with a weight_map)") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index} names the shard {shard!r}, which is missing")
        tensors.update(reader(index.parent / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index} lists {len(missing)} tensor(s) its shards do not hold, e.g. {missing[0]!r}")
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # the library raises its own error type for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict read with weights-only loading: nothing in it is executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"{path} needs code execution to load and is refused ({reason}); convert it to "
            f"safetensors with code you trust"
        ) from None
    except Exception as e:  # truncated file, not a torch file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({first})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a flat state dict of named tensors")
    return state


def _drop_rotary_buffers(tensors: dict[str, torch.Tensor], arch: ModelConfig, src: Path) -> dict[str, torch.Tensor]:
    """Old Llama `.bin` files carry each layer's rotary inv_freq; keep none, after checking it is the
    one rope_theta and head_dim give (else the positions would silently differ)."""
    pair = torch.arange(arch.head_size // 2, dtype=torch.float64)
    inv_freq = (arch.rope_theta ** (-2.0 * pair / arch.head_size)).float()
    out = {}
    for name, tensor in tensors.items():
        if not name.endswith(ROTARY_BUFFER):
            out[name] = tensor
        elif tensor.shape != inv_freq.shape or not torch.allclose(tensor, inv_freq, rtol=1e-5, atol=0):
            raise CheckpointError(
                f"{src}: {name} is not the rotary frequency of rope_theta={arch.rope_theta} "
                f"and head_dim={arch.head_size}; the trainer cannot reproduce its positions"
            )
    return out


def _llama_arch(config: dict) -> ModelConfig:
    problems = [k for k, bad in UNSUPPORTED_LLAMA.items() if k in config and bad(config[k])]
    heads = config["num_attention_heads"]
    if config.get("num_key_value_heads", heads) not in (heads, None):
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


def _teleflm_mup(config: dict, arch: ModelConfig, config_file: Path) -> ModelConfig:
    """The trainer's μP parametrisation of a TeleFLM config: embeddings x input_mult and logits x
    output_mult / mup_scale_factor become input_mult, output_mult and base_hidden_size =
    hidden_size / mup_scale_factor (exactly: the trainer's logit scale is then the same float)."""
    use_mup = config.get("use_mup", False)
    if not isinstance(use_mup, bool):
        raise CheckpointError(f"{config_file}: use_mup must be true or false, got {use_mup!r}")
    if not use_mup:  # the multipliers are not applied (as in vLLM's TeleFLM model), whatever their values
        return arch
    values = {}
    for key in MUP_KEYS[1:]:
        if key not in config:
            raise CheckpointError(f"{config_file}: use_mup is true but the key {key!r} is missing")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{config_file}: {key} must be a finite number > 0, got {value!r}")
        values[key] = float(value)
    scale, hidden = values["mup_scale_factor"], arch.hidden_size
    base = round(hidden / scale)
    if base < 1 or hidden / base != scale:
        raise CheckpointError(
            f"{config_file}: mup_scale_factor {scale!r} is not hidden_size {hidden} divided by a "
            f"whole base width, so the trainer's μP (width_mult = hidden_size / base_hidden_size) "
            f"cannot reproduce its logit multiplier exactly"
        )
    return replace(arch, input_mult=values["input_mult"], output_mult=values["output_mult"], base_hidden_size=base)


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
