"""Every attention backend that can run here against the reference math attention.

On CPU: sdpa in fp32 (flash and te report why they cannot run). On a CUDA GPU: sdpa, flash and
te (when installed) in bf16, against the reference computed in fp32 from the same bf16 inputs.
Forward outputs and input gradients, causal, for RoPE and xPos-rotated q and k (the model
rotates before attention, so every backend sees the same inputs).

    python benchmarks/attention_parity.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig
from flm_lightning.model.attention import ATTENTION_BACKENDS, attend
from flm_lightning.model.layers import RotaryEmbedding, apply_rotary


def rotated_inputs(position: str, device: torch.device, dtype: torch.dtype, bsz=2, heads=8, seq=512, head_dim=128):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=heads * head_dim, n_heads=heads, max_seq_len=seq, position=position)
    tables = RotaryEmbedding(cfg).to(device)(torch.arange(seq, device=device))
    q, k, v = (torch.randn(bsz, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    q, k = apply_rotary(q, k, tables)
    return q, k, v


def compare(backend: str, position: str, device: torch.device, dtype: torch.dtype) -> dict:
    q, k, v = rotated_inputs(position, device, dtype)
    grad_out = torch.randn_like(q)
    outputs = {}
    for name in (backend, "math"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, name)
        out.backward(grad_out)
        outputs[name] = (out.float(), [t.grad.float() for t in leaves])
    (out, grads), (ref, ref_grads) = outputs[backend], outputs["math"]
    return {"backend": backend, "position": position, "dtype": str(dtype).replace("torch.", ""),
            "max_abs_out": (out - ref).abs().max().item(),
            "max_abs_grad": max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    print(f"device {device}, inputs {dtype}; reference: math attention in fp32")
    print(f"{'backend':<7} {'position':<8} {'max |out - ref|':>16} {'max |grad - ref|':>17}")
    for backend in ATTENTION_BACKENDS:
        if backend in ("math", "auto"):
            continue
        for position in ("rope", "xpos"):
            try:
                row = compare(backend, position, device, dtype)
            except ConfigError as e:
                print(f"{backend:<7} {position:<8} {e}")
                continue
            rows.append(row)
            print(f"{backend:<7} {position:<8} {row['max_abs_out']:16.3e} {row['max_abs_grad']:17.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
