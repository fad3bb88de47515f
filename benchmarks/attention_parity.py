"""Every attention backend that can run here against the reference math attention in fp32.

On CPU: sdpa in fp32 by default. On a CUDA GPU: bf16 inputs for sdpa (its default kernel and each
kernel forced through `torch.nn.attention.sdpa_kernel`: flash, cuDNN, memory-efficient), flash and
te (when they import), against the math reference computed in fp32 from the same (bf16) inputs.
Forward outputs and input gradients, causal, for RoPE and xPos-rotated q and k (the model rotates
before attention, so every backend sees the same inputs). The row `bf16 rounding` is the error of
the reference merely rounded to the input dtype: no bf16 kernel can be expected to beat it.
A backend that cannot run gets a row saying why.

    python benchmarks/attention_parity.py [--json OUT.json] [--dtype bfloat16] [--seq 2048] [--heads 16]
"""

from __future__ import annotations

import argparse
import json

import torch

from flm_lightning.errors import ConfigError
from flm_lightning.model import ModelConfig
from flm_lightning.model.attention import ATTENTION_BACKENDS, attend
from flm_lightning.model.layers import RotaryEmbedding, apply_rotary

SDPA_KERNELS = {
    "sdpa[flash]": "FLASH_ATTENTION",
    "sdpa[cudnn]": "CUDNN_ATTENTION",
    "sdpa[efficient]": "EFFICIENT_ATTENTION",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rotated_inputs(position: str, device: torch.device, dtype: torch.dtype, bsz=2, heads=8, seq=512, head_dim=128):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=heads * head_dim, n_heads=heads, max_seq_len=seq, position=position)
    tables = RotaryEmbedding(cfg).to(device)(torch.arange(seq, device=device))
    q, k, v = (torch.randn(bsz, heads, seq, head_dim, device=device, dtype=dtype) for _ in range(3))
    q, k = apply_rotary(q, k, tables)
    return q, k, v


def _run(backend: str, inputs, grad_out):
    """Output and input gradients of one backend ("sdpa[kernel]" forces that sdpa kernel)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if backend in SDPA_KERNELS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[backend])):
            out = attend(*leaves, "sdpa")
            out.backward(grad_out.to(out.dtype))
    else:
        out = attend(*leaves, backend)
        out.backward(grad_out.to(out.dtype))
    return out.float(), [t.grad.float() for t in leaves]


def _diff(result, reference) -> tuple[float, float]:
    (out, grads), (ref, ref_grads) = result, reference
    return (out - ref).abs().max().item(), max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))


def compare(backend: str, position: str, device: torch.device, dtype: torch.dtype, **shape) -> dict:
    """One backend on `dtype` inputs against math attention on the same inputs in fp32."""
    q, k, v = rotated_inputs(position, device, dtype, **shape)
    grad_out = torch.randn(q.shape, device=device, dtype=torch.float32)
    reference = _run("math", [t.float() for t in (q, k, v)], grad_out)
    out, grad = _diff(_run(backend, (q, k, v), grad_out), reference)
    return {
        "backend": backend,
        "position": position,
        "dtype": str(dtype).replace("torch.", ""),
        "max_abs_out": out,
        "max_abs_grad": grad,
    }


def rounding_floor(position: str, device: torch.device, dtype: torch.dtype, **shape) -> dict:
    """The reference's own error once rounded to `dtype`: the floor for any kernel of that dtype."""
    q, k, v = rotated_inputs(position, device, dtype, **shape)
    grad_out = torch.randn(q.shape, device=device, dtype=torch.float32)
    out, grads = _run("math", [t.float() for t in (q, k, v)], grad_out)
    rounded = (out.to(dtype).float(), [g.to(dtype).float() for g in grads])
    diff_out, diff_grad = _diff(rounded, (out, grads))
    return {
        "backend": f"{str(dtype).replace('torch.', '')} rounding",
        "position": position,
        "dtype": str(dtype).replace("torch.", ""),
        "max_abs_out": diff_out,
        "max_abs_grad": diff_grad,
    }


def backends_for(device: torch.device) -> list[str]:
    names = [b for b in ATTENTION_BACKENDS if b not in ("math", "auto")]
    return names[:1] + list(SDPA_KERNELS) + names[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="input dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = dict(bsz=args.batch, heads=args.heads, seq=args.seq, head_dim=args.head_dim)
    rows = []
    print(
        f"device {device}, inputs {dtype}, B {args.batch} H {args.heads} T {args.seq} D {args.head_dim}, causal; "
        "reference: math attention in fp32 on the same inputs"
    )
    print(f"{'backend':<18} {'position':<8} {'max |out - ref|':>16} {'max |grad - ref|':>17}")
    positions = ("rope", "xpos")
    if dtype != torch.float32:
        for position in positions:
            row = rounding_floor(position, device, dtype, **shape)
            rows.append(row)
            print(f"{row['backend']:<18} {position:<8} {row['max_abs_out']:16.3e} {row['max_abs_grad']:17.3e}")
    for backend in backends_for(device):
        for position in positions:
            try:
                row = compare(backend, position, device, dtype, **shape)
            except (ConfigError, RuntimeError, ImportError, OSError) as e:
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                rows.append({"backend": backend, "position": position, "skipped": reason})
                print(f"{backend:<18} {position:<8} cannot run: {reason}")
                break  # the same reason for the other position
            rows.append(row)
            print(f"{backend:<18} {position:<8} {row['max_abs_out']:16.3e} {row['max_abs_grad']:17.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""),
                    "shape": f"B{args.batch} H{args.heads} T{args.seq} D{args.head_dim}",
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
