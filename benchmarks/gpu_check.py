"""Helpers of benchmarks/gpu_check.sh (one prepared GPU run); each subcommand is one stage or step.

    python benchmarks/gpu_check.py install-wheels WHEEL_DIR TARGET   # only distributions not installed
    python benchmarks/gpu_check.py env OUT_DIR          # versions, GPU, backends (env.json, backends.tsv)
    python benchmarks/gpu_check.py matmul OUT_DIR       # measured dense bf16 matmul TFLOP/s (matmul.json)
    python benchmarks/gpu_check.py run [--sdpa-kernel K] [--memlog F] -- main.py fit ... | -m flm_lightning ...
    python benchmarks/gpu_check.py summary OUT_DIR      # summary.md from everything under OUT_DIR

`install-wheels` and `summary` use the standard library only (and tensorboard when installed), so
they run before anything is installed and after anything failed. Everything else imports torch.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
WHY_NO_FLASH = (
    "PyPI has flash-attn only as a source archive (it needs nvcc and a long build); "
    "see docs/performance.md, 'GPU: prepared, not yet run'"
)
WHY_NO_TE = (
    "transformer-engine-torch is a source archive on PyPI and the CUDA 13 core wheel is 276 MB, "
    "beyond the 64 MiB carry; see docs/performance.md"
)
WHY_NO_FA4 = (
    "flash-attn 4 (flash_attn.cute) has no wheel on PyPI (flash-attn-cute 0.0.1 is a placeholder) and "
    "its nvidia-cutlass-dsl libraries are about 92 MB per CUDA version; this project has no fa4 backend"
)


# ---- wheels -----------------------------------------------------------------------------------
def wheel_name(path: str) -> tuple[str, str]:
    """(normalised distribution name, version) of a wheel file name."""
    name, version = Path(path).name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def installed_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install_wheels(wheel_dir: str, target: str) -> None:
    """Install the wheels of `wheel_dir` whose distribution this Python lacks into `target`.

    A distribution the machine already has is kept (a newer or older copy on PYTHONPATH would
    shadow what its torch and lightning were installed with). pip when there is one, else unzip
    (what a pure or platform wheel install amounts to without entry points).
    """
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    missing = []
    for path in wheels:
        name, version = wheel_name(path)
        have = installed_version(name)
        if have is None:
            missing.append(path)
            print(f"install {name} {version}")
        else:
            print(f"keep    {name} {have} (machine's; wheel {version} not used)")
    if not missing:
        print("nothing to install")
        return
    os.makedirs(target, exist_ok=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if pip.returncode == 0:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                target,
                *missing,
            ]
        )
        if done.returncode == 0:
            return
        print("pip install failed; unzipping the wheels instead")
    for path in missing:
        with zipfile.ZipFile(path) as wheel:
            wheel.extractall(target)
    print(f"unzipped {len(missing)} wheels into {target}")


# ---- environment --------------------------------------------------------------------------------
def _import_reason(module: str) -> Optional[str]:
    """None when `module` imports, else why not (the exception, one line)."""
    import importlib

    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # an installed but broken binary raises ImportError/OSError/RuntimeError
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def sdpa_kernel_reason(kernel: str, device, dtype) -> Optional[str]:
    """None when sdpa runs with only `kernel` enabled on causal [B, H, T, D] inputs like the model's, else why."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 4, 256, 128, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    try:
        with sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[kernel])):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return None
    except Exception as e:
        return " ".join(str(e).split())[:300] or type(e).__name__


def default_sdpa_kernel(device, dtype, seq: int = 2048, heads: int = 16, head_dim: int = 128) -> str:
    """The kernel plain sdpa picks for causal inputs of the model's shape."""
    import torch
    from torch.nn.attention import SDPBackend

    q = torch.empty(4, heads, seq, head_dim, device=device, dtype=dtype)
    try:
        choice = torch._fused_sdp_choice(q, q, q, None, 0.0, True)
    except Exception as e:
        return f"unknown ({type(e).__name__})"
    names = {member.value: name for name, member in SDPBackend.__members__.items()}
    return names.get(int(choice), str(choice))


def backend_rows(device, dtype) -> list[tuple[str, bool, str]]:
    """(backend, usable, reason or detail) for every attention implementation the check knows."""
    from flm_lightning.model.attention import unavailable_reason

    rows = [
        (
            "sdpa",
            True,
            f"default kernel {default_sdpa_kernel(device, dtype)} for bf16 causal B4 H16 T2048 D128"
            if device.type == "cuda"
            else "runs everywhere",
        )
    ]
    for kernel in ("flash", "cudnn", "efficient"):
        reason = sdpa_kernel_reason(kernel, device, dtype)
        detail = reason or f"torch.nn.attention.sdpa_kernel({SDPA_KERNELS[kernel]})"
        rows.append((f"sdpa_{kernel}", reason is None, detail))
    packages = (("flash", "flash_attn", WHY_NO_FLASH), ("te", "transformer_engine.pytorch", WHY_NO_TE))
    for backend, module, why in packages:
        reason = _import_reason(module)
        if reason is not None:
            why = f" ({why})" if "No module" in reason else ""
            rows.append((backend, False, f"cannot import {module}: {reason}{why}"))
            continue
        reason = unavailable_reason(backend, device, dtype, masked=False)
        rows.append((backend, reason is None, reason or f"{module} imports"))
    reason = _import_reason("flash_attn.cute")
    rows.append(
        (
            "fa4",
            False,
            f"cannot import flash_attn.cute: {reason} ({WHY_NO_FA4})"
            if reason
            else "flash_attn.cute imports, but the project has no fa4 attention backend yet",
        )
    )
    return rows


def requirement_problems() -> list[str]:
    """The project's dependencies (pyproject.toml) that this Python does not satisfy."""
    try:
        import tomllib
    except ImportError:
        return ["(python < 3.11: pyproject.toml not checked)"]
    from packaging.requirements import Requirement

    problems = []
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        have = installed_version(req.name)
        if have is None:
            problems.append(f"{req.name}: not installed (needs {req.specifier or 'any'})")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have}: outside {req.specifier}")
        for extra in req.extras:
            from importlib import metadata

            for dep in metadata.requires(req.name) or []:
                sub = Requirement(dep)
                wanted = sub.marker is not None and sub.marker.evaluate({"extra": extra})
                if wanted and installed_version(sub.name) is None:
                    problems.append(f"{req.name}[{extra}] needs {sub.name}: not installed")
    return problems


def cmd_env(out: str, dry_run: bool) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        print("error: no CUDA GPU visible to torch (GPU_CHECK_DRY_RUN=1 runs the CPU smoke test)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda and not dry_run else "cpu")
    dtype = torch.bfloat16
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": str(device),
        "dry_run": dry_run,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        from flm_lightning.callbacks.throughput import device_peak_tflops

        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            spec_peak_tflops=device_peak_tflops(device),
            driver=_driver(),
        )
    for name in ("lightning", "jsonargparse", "torchmetrics", "transformers", "tokenizers", "tensorboard", "numpy"):
        info[name] = installed_version(name)
    info["requirement_problems"] = requirement_problems()
    rows = backend_rows(device, dtype)
    info["backends"] = [{"backend": b, "usable": ok, "detail": d} for b, ok, d in rows]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(out, "backends.tsv"), "w") as f:
        for b, ok, d in rows:
            f.write(f"{b}\t{'yes' if ok else 'no'}\t{d}\n")
    for key, value in info.items():
        if key != "backends":
            print(f"{key}: {value}")
    for b, ok, d in rows:
        print(f"backend {b:<14} {'usable' if ok else 'NOT USABLE':<10} {d}")
    return 0


def _driver() -> Optional[str]:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---- matmul peak ---------------------------------------------------------------------------------
def cmd_matmul(out: str, dry_run: bool) -> int:
    """Dense bf16 matmul TFLOP/s: the achievable ceiling MFU can also be read against."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    sizes, iters = ((4096, 8192, 16384), 30) if device.type == "cuda" else ((256,), 3)
    best = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best[n] = 2 * n**3 * iters / (time.perf_counter() - start) / 1e12
        print(f"bf16 matmul {n}^3: {best[n]:.4g} TFLOP/s")
    result = {"device": str(device), "tflops_by_size": best, "measured_peak_tflops": max(best.values())}
    with open(os.path.join(out, "matmul.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


# ---- a tool or fit under a forced sdpa kernel, with memory notes -----------------------------------
def cmd_run(kernel: Optional[str], memlog: Optional[str], argv: list[str]) -> int:
    """Run `-m flm_lightning ...` or `main.py ...` in this process, with only sdpa kernel `kernel`
    enabled (the flags are process-wide, so the trainer, the loop and compiled graphs all use it).

    --memlog: a JSON list of CUDA bytes allocated when each bench run starts (bench reports the
    absolute peak, so memory left over from an earlier run in the process would count) and the
    process's max_memory_allocated at the end."""
    import runpy

    import torch

    if kernel:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[kernel])).__enter__()  # for the whole process
        print(f"gpu_check: sdpa restricted to {SDPA_KERNELS[kernel]}", file=sys.stderr)
    notes: dict = {"run_start_allocated_bytes": []}
    if memlog:
        from flm_lightning.tools import bench

        start = bench.start_peak_memory

        def noted_start(device):
            if device.type == "cuda":
                notes["run_start_allocated_bytes"].append(torch.cuda.memory_allocated(device))
            return start(device)

        bench.start_peak_memory = noted_start
    sys.path.insert(0, str(REPO))
    code = 0
    try:
        if argv[:1] == ["-m"]:
            sys.argv = [f"python -m {argv[1]}", *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if memlog:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                notes["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            with open(memlog, "w") as f:
                json.dump(notes, f)
    return code


# ---- summary ---------------------------------------------------------------------------------------
def _load(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _count(path: str, pattern: str) -> Optional[int]:
    try:
        return len(re.findall(pattern, Path(path).read_text(errors="replace")))
    except OSError:
        return None


def _tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events)
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def cmd_summary(out: str) -> int:
    env = _load(os.path.join(out, "env.json")) or {}
    matmul = _load(os.path.join(out, "matmul.json")) or {}
    measured = matmul.get("measured_peak_tflops")
    lines = ["# GPU check summary", ""]
    if env:
        where = env.get("gpu") or env.get("device")
        lines.append(
            f"Device {where} (capability {env.get('capability', '-')}, driver {env.get('driver', '-')}); "
            f"Python {env.get('python')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn')}, Lightning {env.get('lightning')}"
            + ("; **CPU dry run: numbers are plumbing only**" if env.get("dry_run") else "")
            + "."
        )
        if env.get("requirement_problems"):
            lines.append(f"Unmet project requirements: {'; '.join(env['requirement_problems'])}.")
    if measured:
        spec = env.get("spec_peak_tflops")
        lines.append(
            f"Measured dense bf16 matmul: {measured:.4g} TFLOP/s"
            + (f" (spec peak used for MFU: {spec:g})" if spec else "")
            + "."
        )
    lines += ["", "## Stages", "", "| stage | status | seconds | limit s | log / note |", "|---|---|---|---|---|"]
    for row in _stage_rows(out):
        lines.append("| " + " | ".join(row) + " |")
    backends = env.get("backends") or []
    if backends:
        lines += ["", "## Attention backends", "", "| backend | usable | detail |", "|---|---|---|"]
        lines += [
            f"| {b['backend']} | {'yes' if b['usable'] else '**no**'} | {b['detail'].replace('|', '/')} |"
            for b in backends
        ]
    lines += _parity_section(out)
    lines += _bench_section(out, measured)
    lines += _fit_section(out)
    text = "\n".join(lines) + "\n"
    Path(out, "summary.md").write_text(text)
    print(text)
    return 0


def _stage_rows(out: str) -> list[list[str]]:
    rows = []
    try:
        for line in Path(out, "stages.tsv").read_text().splitlines():
            name, status, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
            log = f"logs/{name}.log" if Path(out, "logs", f"{name}.log").exists() else ""
            shown = status if status == "ok" else f"**{status}**"
            rows.append([name, shown, seconds, limit, "; ".join(x for x in (log, note.replace("|", "/")) if x)])
    except OSError:
        pass
    return rows


def _parity_section(out: str) -> list[str]:
    parity = _load(os.path.join(out, "parity.json"))
    if not parity:
        return []
    lines = [
        "",
        f"## Attention parity ({parity.get('dtype')} inputs on {parity.get('device')}, "
        f"shape {parity.get('shape')}, reference: math attention in fp32)",
        "",
        "| backend | position | max abs out | max abs grad | note |",
        "|---|---|---|---|---|",
    ]
    for r in parity.get("rows", []):
        if "max_abs_out" in r:
            lines.append(f"| {r['backend']} | {r['position']} | {r['max_abs_out']:.3e} | {r['max_abs_grad']:.3e} | |")
        else:
            lines.append(f"| {r['backend']} | {r['position']} | - | - | {r.get('skipped', '').replace('|', '/')} |")
    return lines


def _bench_section(out: str, measured: Optional[float]) -> list[str]:
    results = []
    order = [row[0] for row in _stage_rows(out)]  # the order the stages ran in
    paths = [p for p in glob.glob(os.path.join(out, "bench", "*.json")) if not p.endswith(".mem.json")]
    for path in sorted(paths, key=lambda p: (order.index(Path(p).stem) if Path(p).stem in order else len(order), p)):
        r = _load(path)
        if r and "median_ratio" in r:
            results.append((Path(path).stem, r, _load(path[:-5] + ".mem.json") or {}))
    if not results:
        return []
    lines = [
        "",
        "## Throughput (`python -m flm_lightning bench`, medians over repeats)",
        "",
        "| run | trainer tok/s | loop tok/s | trainer/loop | MFU trainer (spec) | MFU loop (spec) "
        "| MFU trainer (measured matmul) | peak GiB trainer | peak GiB loop | GiB allocated at run starts "
        "| graph breaks | recompiles |",
        "|---" * 12 + "|",
    ]
    for name, r, mem in results:
        trainer, loop = _median(r["trainer_tokens_per_sec"]), _median(r["loop_tokens_per_sec"])
        mfu_t = f"{r['trainer_mfu']:.1%}" if "trainer_mfu" in r else "n/a"
        mfu_l = f"{r['loop_mfu']:.1%}" if "loop_mfu" in r else "n/a"
        tflops = r.get("trainer_tflops")
        mfu_m = f"{tflops / measured:.1%}" if tflops and measured else "n/a"
        starts = ", ".join(_gib(b) for b in mem.get("run_start_allocated_bytes", [])) or "n/a"
        log = os.path.join(out, "logs", f"{name}.log")
        breaks = _count(log, r"(?i)graph break") if "compiled" in name else None
        recompiles = _count(log, r"Recompiling function") if "compiled" in name else None
        lines.append(
            f"| {name} | {trainer:,.0f} | {loop:,.0f} | {r['median_ratio']:.3f} | {mfu_t} | {mfu_l} | {mfu_m} "
            f"| {_gib(r.get('trainer_peak_memory_bytes'))} | {_gib(r.get('loop_peak_memory_bytes'))} "
            f"| {starts} | {'-' if breaks is None else breaks} "
            f"| {'-' if recompiles is None else recompiles} |"
        )
    first = results[0][1]
    lines.append("")
    lines.append(
        f"Config {first['config']}: {first['parameters'] / 1e6:.1f}M parameters, "
        f"batch {first['batch_size']} x "
        f"seq {first['seq_len']}, {first['precision']}, {first['steps']} timed steps after {first['warmup']}, "
        f"{first['repeats']} repeat(s). Peak memory is CUDA max_memory_allocated of each run (on CPU: "
        "resident memory above the start); 'allocated at run starts' is what earlier runs in the same "
        "process left (included in the peaks)."
    )
    return lines


def _fit_section(out: str) -> list[str]:
    lines = []
    for folder in sorted(glob.glob(os.path.join(out, "fit*"))):
        if not os.path.isdir(folder):
            continue
        name = Path(folder).name
        scalars = _tensorboard_scalars(folder)
        mem = _load(os.path.join(out, "logs", f"{name}.mem.json")) or {}
        if not lines:
            lines = [
                "",
                "## `python main.py fit` under FLMParallelStrategy 1x1x1 (FSDP2, bf16 params, fp32 reduce)",
                "",
                "| run | steps logged | first loss | last loss | tokens/s (last) | MFU (last) | max GiB allocated "
                "| TensorBoard |",
                "|---|---|---|---|---|---|---|---|",
            ]
        loss = scalars.get("train/loss", [])
        tps, mfu = scalars.get("throughput/tokens_per_sec", []), scalars.get("throughput/mfu", [])
        events = sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True))
        lines.append(
            f"| {name} | {len(loss)} | {loss[0][1] if loss else float('nan'):.4f} "
            f"| {loss[-1][1] if loss else float('nan'):.4f} | {tps[-1][1] if tps else float('nan'):,.0f} "
            f"| {f'{mfu[-1][1]:.1%}' if mfu else 'n/a'} | {_gib(mem.get('max_memory_allocated_bytes'))} "
            f"| {os.path.relpath(events[0], out) if events else 'none'} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install-wheels")
    p.add_argument("wheel_dir")
    p.add_argument("target")
    for name in ("env", "matmul", "summary"):
        sub.add_parser(name).add_argument("out")
    p = sub.add_parser("run")
    p.add_argument("--sdpa-kernel", choices=sorted(SDPA_KERNELS))
    p.add_argument("--memlog")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    dry_run = os.environ.get("GPU_CHECK_DRY_RUN", "0") not in ("", "0")
    if args.cmd == "install-wheels":
        install_wheels(args.wheel_dir, args.target)
        return 0
    if args.cmd == "env":
        return cmd_env(args.out, dry_run)
    if args.cmd == "matmul":
        return cmd_matmul(args.out, dry_run)
    if args.cmd == "summary":
        return cmd_summary(args.out)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return cmd_run(args.sdpa_kernel, args.memlog, argv)


if __name__ == "__main__":
    sys.exit(main())
