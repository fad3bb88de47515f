"""Peer benchmark: this trainer (`main.py fit`) against LitGPT (`litgpt pretrain`) on the same model.

    python benchmarks/litgpt_peer.py [-c conf/tiny.yaml] [--precision 32-true,bf16-mixed] [--steps 30]
        [--warmup 5] [--repeats 5] [--threads N] [--compile off|on] [--json OUT.json] [--png OUT.png]

What is the same on both sides: the model shape (by default the 5.3M Llama shape of issue 20: conf/tiny.yaml's
4 layers at hidden 256, 4 heads, SwiGLU 704, RMSNorm, RoPE, untied, vocabulary 4096), sequence length 256,
micro-batch 8 (no accumulation), precision, AdamW with the same learning rate, betas, epsilon, warmup +
cosine schedule and gradient clipping, the seed, the logging cadence (`trainer.log_every_n_steps`) and the
data: the batches the trainer reads from the prepared python-docs corpus are written once, in its order, to
a .npy file that LitGPT reads through `benchmarks/litgpt_peer_data.py` (no litdata, no network). The
parameter counts of both runs are compared (and this script refuses to report if they differ), and so
are checksums of every batch's input tokens.

Each run is a fresh process; the side that goes first alternates between repeats. Timing, the same on
both sides: `time.perf_counter()` and `time.process_time()` at the start of every step, inside the
training process (the trainer: a callback's `on_train_batch_start`, `benchmarks/litgpt_peer_clock.py`;
LitGPT: its training DataLoader, which runs in the training process, when the loop asks for the next
batch). Tokens/s = steps x batch x seq_len / (clock at the start of step warmup + steps - clock at the start
of step warmup), so data loading, logging and every per-step hook count. LitGPT's own per-iteration log
("iter time", which leaves out data loading and logging) is parsed as a cross-check.

LitGPT is installed by this script into its own virtual environment (`--venv`, default
`.cache/litgpt-venv`, git-ignored): first this project's torch build (same version string), then
`litgpt==0.5.13` and `requests` (its CLI needs it) under a constraints file that pins torch and Lightning
to this environment's versions, so pip never fetches another torch; the install is refused if pip's output
mentions a torch or nvidia download. LitGPT is never a dependency of the trainer.

LitGPT's `pretrain` always wraps the model in `torch.compile`. `--compile off` (default) runs both sides
eager: `TORCH_COMPILE_DISABLE=1` in both environments (the trainer does not compile anyway). `--compile on`
compiles both: LitGPT the whole model (its default), the trainer each block (`model.compile=true`).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

LITGPT_VERSION = "0.5.13"
LITGPT_EXTRA = ("requests",)  # litgpt 0.5.13's CLI enables URL config reading, which imports requests
CLOCK_CALLBACK = "benchmarks.litgpt_peer_clock.PeerStepClock"
DATA_MODULE = "benchmarks.litgpt_peer_data.PreparedWindows"
CHECKPOINT_CALLBACKS = ("ModelCheckpoint", "PreemptionCheckpoint")
PRECISIONS = ("32-true", "bf16-mixed")
# The 5.3M-parameter Llama shape of issue 20 on conf/tiny.yaml (its 4 layers).
DEFAULT_SETS = (
    "model.arch.hidden_size=256",
    "model.arch.n_heads=4",
    "model.arch.ffn_hidden_size=704",
    "model.arch.vocab_size=4096",
    "model.arch.max_seq_len=256",
    "data.init_args.vocab_size=4096",
    "data.init_args.seq_len=256",
    "data.init_args.batch_size=8",
)


from flm_lightning.errors import ConfigError  # noqa: E402 (after the path set-up above)


class PeerError(RuntimeError):
    """A condition under which the comparison would not be fair or a run failed."""


# ---- pure parts (tested without LitGPT) --------------------------------------------------------
def litgpt_model_config(arch, name: str = "flm-peer") -> dict:
    """A LitGPT `Config` (as a dict, the fields of its YAML) for our `ModelConfig` `arch`.

    Only what both implement: RoPE over the whole head (rotate-half), no μP multipliers, no dropout.
    """
    if arch.position != "rope":
        raise PeerError(f"model.arch.position={arch.position!r}: LitGPT has no xPos; use rope")
    if arch.input_mult != 1.0 or arch.output_mult != 1.0 or arch.width_mult != 1.0:
        raise PeerError("μP multipliers (input_mult, output_mult, base_hidden_size) have no LitGPT counterpart")
    if arch.dropout:
        raise PeerError("model.arch.dropout must be 0: LitGPT's GPT has no dropout")
    cfg = {
        "name": name,
        "block_size": arch.max_seq_len,
        "n_layer": arch.n_layers,
        "n_embd": arch.hidden_size,
        "n_head": arch.n_heads,
        "n_query_groups": arch.n_heads,
        "head_size": arch.head_size,
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": arch.padded_vocab_size,
        "padding_multiple": arch.pad_vocab_multiple,
        "bias": arch.bias,
        "lm_head_bias": False,
        "norm_class_name": "RMSNorm" if arch.norm == "rmsnorm" else "LayerNorm",
        "norm_eps": arch.norm_eps,
        "parallel_residual": False,
        "shared_attention_norm": False,
        "rotary_percentage": 1.0,
        "rope_base": int(arch.rope_theta),
        "intermediate_size": arch.ffn_size,
    }
    if arch.activation == "swiglu":
        cfg["mlp_class_name"] = "LLaMAMLP"
    else:
        cfg.update(mlp_class_name="GptNeoxMLP", gelu_approximate="tanh")
    return cfg


def litgpt_parameter_count(cfg: dict, tie_embeddings: bool = False) -> int:
    """Parameters of LitGPT's `GPT(Config(**cfg))`, counted by hand from its module layout."""
    d, heads, groups, hs = cfg["n_embd"], cfg["n_head"], cfg.get("n_query_groups") or cfg["n_head"], cfg["head_size"]
    bias, ffn, vocab = cfg["bias"], cfg["intermediate_size"], cfg["padded_vocab_size"]
    norm = d * (2 if cfg["norm_class_name"] == "LayerNorm" else 1)  # LitGPT's LayerNorm always has a shift
    qkv = d * (heads + 2 * groups) * hs + (heads + 2 * groups) * hs * (bias or cfg.get("attn_bias", False))
    proj = heads * hs * d + d * bias
    n_mats = 3 if cfg["mlp_class_name"] == "LLaMAMLP" else 2
    mlp = n_mats * d * ffn + ((2 * ffn + d) if n_mats == 3 else (ffn + d)) * bias
    block = 2 * norm + qkv + proj + mlp
    head = 0 if tie_embeddings else d * vocab + vocab * cfg.get("lm_head_bias", False)
    return vocab * d + cfg["n_layer"] * block + norm + head


_ITER_LINE = re.compile(
    r"iter (?P<iter>\d+) step (?P<step>\d+) \| loss train: (?P<loss>[-\d.naif]+),.*?"
    r"iter time: (?P<ms>[\d.]+) ms"
)
_PARAMS_LINE = re.compile(r"Total parameters: (?P<n>[\d,]+)")


def parse_litgpt_log(text: str) -> dict:
    """LitGPT pretrain's console output: the parameter count and every per-iteration line."""
    params = _PARAMS_LINE.search(text)
    iters = [
        {"iter": int(m["iter"]), "step": int(m["step"]), "loss": float(m["loss"]), "iter_time_ms": float(m["ms"])}
        for m in _ITER_LINE.finditer(text)
    ]
    return {"parameters": int(params["n"].replace(",", "")) if params else None, "iters": iters}


def clock_throughput(record: dict, warmup: int, steps: int, tokens_per_step: int) -> dict:
    """Tokens/s by wall clock and by process CPU time between the starts of step `warmup` and `warmup + steps`."""
    if len(record["wall"]) <= warmup + steps:
        raise PeerError(
            f"{record.get('side', '?')}: clocked {len(record['wall'])} step starts, need {warmup + steps + 1}"
        )
    tokens = steps * tokens_per_step
    wall = record["wall"][warmup + steps] - record["wall"][warmup]
    cpu = record["cpu"][warmup + steps] - record["cpu"][warmup]
    return {
        "tokens_per_sec": tokens / wall,
        "tokens_per_cpu_sec": tokens / cpu,
        "timed_wall_s": wall,
        "timed_cpu_s": cpu,
    }


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and interquartile range (as `python -m flm_lightning bench`)."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "iqr": quartiles[2] - quartiles[0],
    }


def summarize(ours: Sequence[dict], litgpt: Sequence[dict]) -> dict:
    """Spread of each side's tokens/s (wall and CPU time) and of the paired ratios ours / LitGPT."""
    ratios = [o["tokens_per_sec"] / p["tokens_per_sec"] for o, p in zip(ours, litgpt)]
    cpu_ratios = [o["tokens_per_cpu_sec"] / p["tokens_per_cpu_sec"] for o, p in zip(ours, litgpt)]
    return {
        "ours": spread([r["tokens_per_sec"] for r in ours]),
        "litgpt": spread([r["tokens_per_sec"] for r in litgpt]),
        "ours_cpu": spread([r["tokens_per_cpu_sec"] for r in ours]),
        "litgpt_cpu": spread([r["tokens_per_cpu_sec"] for r in litgpt]),
        "ratio": spread(ratios),
        "cpu_ratio": spread(cpu_ratios),
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
    }


def litgpt_log_throughput(iters: Sequence[dict], warmup: int, steps: int, tokens_per_step: int) -> Optional[float]:
    """LitGPT's own view: tokens / median logged `iter time` of the timed iterations (no data loading, no logging)."""
    times = [i["iter_time_ms"] for i in iters if warmup < i["iter"] <= warmup + steps]
    return tokens_per_step / (statistics.median(times) / 1000) if times else None


# ---- configuration -----------------------------------------------------------------------------
def resolve_config(config: str, sets: Sequence[str]) -> dict:
    """The config `main.py fit -c CONFIG --KEY=VALUE ...` would run (every default filled in), read by main.py's
    own parser."""
    from flm_lightning.cli import load_config

    return load_config([config], sets).values


def shape_of(values: dict) -> SimpleNamespace:
    """The model, data and optimisation settings both sides must share, checked for what LitGPT can express."""
    from flm_lightning.model import ModelConfig
    from flm_lightning.optim import OptimConfig

    model = values.get("model") or {}
    arch = ModelConfig.from_dict(model.get("arch") or {})
    optim = OptimConfig(**(model.get("optim") or {}))
    data = (values.get("data") or {}).get("init_args") or {}
    trainer = values.get("trainer") or {}
    seq, batch = data.get("seq_len", 256), data.get("batch_size", 16)
    if data.get("global_batch_size") not in (None, batch):
        raise PeerError("data.global_batch_size must be unset (one micro-batch per step) for the peer benchmark")
    if data.get("reset_at_document_boundaries"):
        raise PeerError("data.reset_at_document_boundaries: LitGPT has no document masks")
    if seq > arch.max_seq_len:
        raise PeerError(f"data.seq_len={seq} > model.arch.max_seq_len={arch.max_seq_len}")
    if optim.decay != "cosine" or optim.decay_steps is not None:
        raise PeerError(
            "model.optim: LitGPT pretrain decays by cosine over the whole run (decay: cosine, no decay_steps)"
        )
    clip = trainer.get("gradient_clip_val")
    if not clip or (trainer.get("gradient_clip_algorithm") or "norm") != "norm":
        raise PeerError("trainer.gradient_clip_val: LitGPT pretrain requires clipping by norm (max_norm)")
    return SimpleNamespace(
        arch=arch,
        optim=optim,
        seq_len=seq,
        batch_size=batch,
        clip=float(clip),
        seed=int(values.get("seed_everything") or 0),
        log_every=int(trainer.get("log_every_n_steps") or 50),
    )


def ours_run_config(values: dict, precision: str, total_steps: int, compile_: bool, run_dir: Path, clock: Path) -> dict:
    """main.py fit's config: validation and checkpoints off, this run's folder, the clock callback added."""
    cfg = copy.deepcopy(values)
    trainer = cfg.setdefault("trainer", {})
    trainer.update(
        precision=precision,
        max_steps=total_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    trainer["callbacks"] = [
        c for c in trainer.get("callbacks") or [] if not str(c.get("class_path", "")).endswith(CHECKPOINT_CALLBACKS)
    ]
    trainer["callbacks"].append({"class_path": CLOCK_CALLBACK, "init_args": {"out": str(clock)}})
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        trainer["logger"] = {**logger, "init_args": {**(logger.get("init_args") or {}), "name": "ours"}}
    cfg.setdefault("model", {})["compile"] = compile_
    return cfg


def litgpt_run_config(
    shape: SimpleNamespace,
    model_config: dict,
    precision: str,
    total_steps: int,
    windows: Path,
    clock: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    log_interval: int,
) -> dict:
    """litgpt pretrain's config: the same shape, batch, schedule, clipping, seed and data."""
    o = shape.optim
    return {
        "model_name": model_config["name"],
        "model_config": model_config,
        "out_dir": str(out_dir),
        "precision": precision,
        "data": {"class_path": DATA_MODULE, "init_args": {"windows": str(windows), "clock": str(clock)}},
        "train": {
            "save_interval": None,
            "log_interval": log_interval,
            "global_batch_size": shape.batch_size,
            "micro_batch_size": shape.batch_size,
            "lr_warmup_steps": o.warmup_steps,
            "max_tokens": total_steps * shape.batch_size * shape.seq_len,
            "max_seq_length": shape.seq_len,
            "tie_embeddings": shape.arch.tie_embeddings,
            "max_norm": shape.clip,
            "min_lr": o.min_lr,
        },
        "eval": {"interval": 10**9, "max_iters": 2, "initial_validation": False, "final_validation": False},
        "optimizer": {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": list(o.betas), "eps": o.eps},
        },
        "devices": 1,
        "num_nodes": 1,
        "tokenizer_dir": str(tokenizer_dir),
        "logger_name": "csv",  # tensorboard is not among LitGPT's dependencies
        "seed": shape.seed,
    }


# ---- data --------------------------------------------------------------------------------------
def dump_windows(values: dict, total_steps: int, out: Path, tokenizer_dir: Path) -> dict:
    """The trainer's first `total_steps` training batches as rows of seq_len + 1 tokens, and its tokenizer."""
    import numpy as np

    data_cfg = values["data"]
    module, _, name = data_cfg["class_path"].rpartition(".")
    dm = getattr(importlib.import_module(module), name)(**(data_cfg.get("init_args") or {}))
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = SimpleNamespace(max_steps=total_steps, global_rank=0, world_size=1)  # as fit sizes the loader
    rows = []
    for step, batch in enumerate(dm.train_dataloader()):
        if step == total_steps:
            break
        if "position_ids" in batch or "attention_mask" in batch or not bool((batch["loss_mask"] == 1).all()):
            raise PeerError("the trainer's batches carry masks or positions LitGPT cannot read")
        if not bool((batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()):
            raise PeerError("the trainer's labels are not its inputs shifted by one")
        rows.append(np.concatenate([batch["input_ids"].numpy(), batch["labels"][:, -1:].numpy()], axis=1))
    if len(rows) < total_steps:
        raise PeerError(f"the data gave {len(rows)} batches, need {total_steps}")
    windows = np.concatenate(rows).astype(np.int32)
    np.save(out, windows)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(dm.corpora[0].path) / "tokenizer.json", tokenizer_dir / "tokenizer.json")
    return {
        "windows": int(windows.shape[0]),
        "tokens_per_row": int(windows.shape[1]),
        "corpus": str(dm.corpora[0].path),
        "checksums": [int(r[:, :-1].sum()) for r in rows],
    }


# ---- LitGPT's environment ----------------------------------------------------------------------
_PIP_FETCH = re.compile(
    r"^\s*(?:Collecting|Downloading|Processing)\s+(?:\S*/)?"
    r"((?:torch(?=[<>=!~;\[ (]|-\d|$)|nvidia[-_])\S*)",
    flags=re.MULTILINE | re.IGNORECASE,
)


def torch_fetches(pip_output: str) -> list[str]:
    """What pip's output says it collected, downloaded or unpacked of torch itself or of NVIDIA's CUDA wheels."""
    return sorted(set(_PIP_FETCH.findall(pip_output)))


def _versions(python: Path) -> dict:
    code = (
        "import importlib.metadata as m, json\nout = {}\nfor n in ('litgpt', 'torch', 'lightning', 'requests'):\n"
        "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: out[n] = None\nprint(json.dumps(out))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def ensure_litgpt(venv: Path, progress=print) -> dict:
    """LitGPT in its own virtual environment, with this environment's torch and Lightning."""
    import lightning
    import torch

    want = {"litgpt": LITGPT_VERSION, "torch": torch.__version__, "lightning": lightning.__version__}
    python = venv / "bin" / "python"
    if python.exists():
        have = _versions(python)
        if all(have.get(k) == v for k, v in want.items()) and all(have.get(n) for n in LITGPT_EXTRA):
            return have
        progress(f"{venv}: has {have}, want {want}; reinstalling")
        shutil.rmtree(venv)
    progress(f"installing LitGPT {LITGPT_VERSION} into {venv} (torch {want['torch']} first)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    constraints = venv / "peer-constraints.txt"
    constraints.write_text(f"torch=={want['torch']}\nlightning=={want['lightning']}\n")
    logs = []
    for args in ([f"torch=={want['torch']}"], ["-c", str(constraints), f"litgpt=={LITGPT_VERSION}", *LITGPT_EXTRA]):
        done = subprocess.run(pip + args, capture_output=True, text=True)
        logs.append(done.stdout + done.stderr)
        if done.returncode != 0:
            raise PeerError(f"pip install {' '.join(args)} failed:\n{logs[-1][-3000:]}")
    fetched = torch_fetches(logs[1])
    if fetched:
        raise PeerError(f"installing litgpt tried to fetch {sorted(set(fetched))}: torch must stay {want['torch']}")
    have = _versions(python)
    if any(have.get(k) != v for k, v in want.items()):
        raise PeerError(f"{venv}: installed {have}, wanted {want}")
    (venv / "pip-install.log").write_text("\n".join(logs))
    return have


# ---- runs --------------------------------------------------------------------------------------
def _child_env(threads: int, compile_: bool, pythonpath: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("TORCH_COMPILE_DISABLE", None)
    if not compile_:
        env["TORCH_COMPILE_DISABLE"] = "1"  # LitGPT pretrain always calls torch.compile; both sides eager
    env.pop("VIRTUAL_ENV", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_side(side: str, ctx: SimpleNamespace, precision: str, tag: str, warmup: int, steps: int) -> dict:
    """One fresh process of `side` ("ours" or "litgpt"); its clock, throughput and checks."""
    import yaml

    run_dir = ctx.work / precision / f"{tag}_{side}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    clock, log, cfg_path = run_dir / "clock.json", run_dir / "console.log", run_dir / "config.yaml"
    total = warmup + steps + 1
    if side == "ours":
        cfg = ours_run_config(ctx.values, precision, total, ctx.compile, run_dir, clock)
        cmd = [sys.executable, str(REPO / "main.py"), "fit", "-c", str(cfg_path)]
    else:
        log_interval = 1 if tag == "check" else ctx.shape.log_every
        cfg = litgpt_run_config(
            ctx.shape,
            ctx.litgpt_config,
            precision,
            total,
            ctx.windows,
            clock,
            ctx.tokenizer_dir,
            run_dir / "out",
            log_interval,
        )
        cmd = [str(ctx.venv / "bin" / "litgpt"), "pretrain", "--config", str(cfg_path)]
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(
            cmd,
            cwd=REPO,
            env=_child_env(ctx.threads, ctx.compile, side == "litgpt"),
            stdout=out,
            stderr=subprocess.STDOUT,
        ).returncode
    process_s = time.perf_counter() - start
    text = log.read_text(encoding="utf-8", errors="replace")
    if code != 0 or not clock.is_file():
        raise PeerError(f"{side} ({' '.join(cmd)}) exited with {code}; the end of {log}:\n{text[-4000:]}")
    record = json.loads(clock.read_text())
    result = {
        "side": side,
        "precision": precision,
        "process_s": process_s,
        "load_before": load,
        "threads": record["threads"],
        **clock_throughput(record, warmup, steps, ctx.tokens_per_step),
    }
    n = min(total, len(record["checksums"]))
    if record["checksums"][:n] != ctx.checksums[:n]:
        raise PeerError(f"{side}: the batches differ from the trainer's data (checksums of the input tokens)")
    if side == "ours":
        result.update(parameters=record["parameters"], first_loss=record["first_loss"])
    else:
        parsed = parse_litgpt_log(text)
        result.update(
            parameters=parsed["parameters"],
            first_loss=parsed["iters"][0]["loss"] if parsed["iters"] and parsed["iters"][0]["iter"] == 1 else None,
            log_tokens_per_sec=litgpt_log_throughput(parsed["iters"], warmup, steps, ctx.tokens_per_step),
        )
    if result["threads"] != ctx.threads:
        raise PeerError(f"{side} ran with {result['threads']} threads, not {ctx.threads}")
    if result["parameters"] != ctx.parameters:
        raise PeerError(
            f"refusing to report: {side} has {result['parameters']} parameters, the shape has {ctx.parameters}"
        )
    return result


# ---- report ------------------------------------------------------------------------------------
def print_precision(precision: str, runs: list[dict], summary: dict) -> None:
    print(f"\n{precision}: tokens/s (timed steps, wall clock), paired by repeat")
    print(
        f"{'repeat':>6} {'first':>6} {'ours':>9} {'LitGPT':>9} {'ours/LitGPT':>11} {'CPU-time ratio':>14} "
        f"{'LitGPT log*':>11} {'load':>5}"
    )
    for i, r in enumerate(runs, 1):
        o, p = r["ours"], r["litgpt"]
        log = f"{p['log_tokens_per_sec']:,.0f}" if p.get("log_tokens_per_sec") else "-"
        print(
            f"{i:>6} {r['first']:>6} {o['tokens_per_sec']:>9,.0f} {p['tokens_per_sec']:>9,.0f} "
            f"{summary['ratios'][i - 1]:>11.3f} {summary['cpu_ratios'][i - 1]:>14.3f} {log:>11} "
            f"{max(o['load_before'], p['load_before']):>5.1f}"
        )
    for name, label, unit in (
        ("ours", "ours", " tokens/s"),
        ("litgpt", "LitGPT", " tokens/s"),
        ("ratio", "ours/LitGPT", ""),
        ("cpu_ratio", "CPU-time ratio", ""),
        ("ours_cpu", "ours per CPU-s", " tokens"),
        ("litgpt_cpu", "LitGPT per CPU-s", " tokens"),
    ):
        d = summary[name]
        fmt = "{:,.0f}" if unit else "{:.3f}"
        print(
            f"{label:>16}: median {fmt.format(d['median'])}{unit}, min {fmt.format(d['min'])}, "
            f"max {fmt.format(d['max'])}, IQR {fmt.format(d['iqr'])}"
        )
    print(
        "  * LitGPT log: tokens / median of its logged 'iter time' (no data loading or logging), logged iterations only"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = list(result["precisions"])
    fig, axes = plt.subplots(1, len(precisions), figsize=(max(6.0, 4.2 * len(precisions)), 4.4), squeeze=False)
    for ax, precision in zip(axes[0], precisions):
        entry = result["precisions"][precision]
        for x, (side, label, color) in enumerate(
            (("ours", "ours (main.py fit)", "tab:blue"), ("litgpt", f"LitGPT {LITGPT_VERSION}", "tab:orange"))
        ):
            values = [r[side]["tokens_per_sec"] for r in entry["runs"]]
            s = entry["summary"][side]
            q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
            ax.add_patch(plt.Rectangle((x - 0.18, q[0]), 0.36, q[2] - q[0], color=color, alpha=0.2))
            ax.plot([x, x], [s["min"], s["max"]], color=color, lw=1)
            ax.plot([x - 0.22, x + 0.22], [s["median"], s["median"]], color=color, lw=2.5)
            ax.scatter(
                [x + 0.06 * (i - (len(values) - 1) / 2) for i in range(len(values))],
                values,
                color=color,
                s=18,
                zorder=3,
                label=label,
            )
        r = entry["summary"]["ratio"]
        ax.set_title(
            f"{precision}: ours/LitGPT {r['median']:.3f}\n(min {r['min']:.3f}, max {r['max']:.3f}, "
            f"{len(entry['runs'])} repeats)",
            fontsize=9,
        )
        ax.set_xticks([0, 1], ["ours", "LitGPT"])
        ax.set_xlim(-0.6, 1.6)
        ax.set_ylabel("tokens/s (wall clock, timed steps)")
        top = max(entry["summary"][side]["max"] for side in ("ours", "litgpt"))
        ax.set_ylim(0, top * 1.15)
    m = result["meta"]
    fig.suptitle(
        f"{m['parameters'] / 1e6:.2f}M parameters, batch {m['batch_size']} x seq {m['seq_len']}, "
        f"{m['threads']} thread(s), compile {m['compile']},\n{m['steps']} timed steps after {m['warmup']}; "
        f"dots: runs, bar: median, box: IQR, line: min-max",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-c",
        "--config",
        default=str(REPO / "conf" / "tiny.yaml"),
        help="the trainer's config (its depth, optimiser, clipping, logging; default conf/tiny.yaml)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override as in `flm_lightning bench`, applied after the default shape "
        f"({' '.join(DEFAULT_SETS)}); repeatable",
    )
    parser.add_argument(
        "--config-shape",
        action="store_true",
        help="leave out the default shape: the config's own model and data, then any --set",
    )
    parser.add_argument("--precision", default=",".join(PRECISIONS), help="comma-separated: 32-true, bf16-mixed")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=5, help="ours/LitGPT pairs per precision, the first alternating")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
        help="OMP_NUM_THREADS and MKL_NUM_THREADS of both sides (default: this OMP_NUM_THREADS, else all cores)",
    )
    parser.add_argument(
        "--compile",
        choices=("off", "on"),
        default="off",
        help="off: both eager (TORCH_COMPILE_DISABLE=1); on: both torch.compile",
    )
    parser.add_argument("--venv", default=str(REPO / ".cache" / "litgpt-venv"), help="LitGPT's virtual environment")
    parser.add_argument("--work", default=str(REPO / ".cache" / "litgpt-peer"), help="run folders, configs, logs")
    parser.add_argument("--json", default=str(REPO / "runs" / "litgpt_peer" / "peer.json"), help="results JSON")
    parser.add_argument("--png", default=str(REPO / "runs" / "litgpt_peer" / "peer.png"), help="plot of the spread")
    parser.add_argument("--install-only", action="store_true", help="set up LitGPT's environment and stop")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in PRECISIONS:
            parser.error(f"--precision: {p!r} is not one of {', '.join(PRECISIONS)}")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --warmup, --repeats and --threads must be >= 1 (warmup >= 1: step 0 carries start-up)")
    for name in ("config", "venv", "work", "json", "png"):  # as given from here; the runs start in the repository
        setattr(args, name, str(Path(getattr(args, name)).resolve()))
    os.chdir(REPO)  # the trainer's data cache (data.init_args.cache_dir) is relative to the repository
    started = time.time()
    try:
        have = ensure_litgpt(Path(args.venv))
        print(f"LitGPT environment {args.venv}: {have}")
        if args.install_only:
            return 0
        return _benchmark(args, precisions, have, started)
    except (PeerError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _benchmark(args, precisions: list[str], have: dict, started: float) -> int:
    import lightning
    import torch

    from flm_lightning.model import count_model

    sets = ([] if args.config_shape else list(DEFAULT_SETS)) + list(args.set)
    values = resolve_config(args.config, sets)
    shape = shape_of(values)
    parameters = count_model(shape.arch).parameters
    litgpt_config = litgpt_model_config(shape.arch)
    litgpt_count = litgpt_parameter_count(litgpt_config, shape.arch.tie_embeddings)
    print(
        f"shape: {shape.arch.n_layers} layers, hidden {shape.arch.hidden_size}, {shape.arch.n_heads} heads, "
        f"ffn {shape.arch.ffn_size} {shape.arch.activation}, {shape.arch.norm}, "
        f"vocab {shape.arch.padded_vocab_size}, "
        f"seq {shape.seq_len}, batch {shape.batch_size}"
    )
    print(
        f"parameters: ours {parameters:,} (flm_lightning.model.count_model), LitGPT {litgpt_count:,} "
        f"(its module layout, counted by hand)"
    )
    if parameters != litgpt_count:
        raise PeerError("refusing to report: the two models would differ in size")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps + 1
    windows, tokenizer_dir = work / "windows.npy", work / "tokenizer"
    data = dump_windows(values, total, windows, tokenizer_dir)
    print(f"data: {data['windows']} windows of {data['tokens_per_row']} tokens from {data['corpus']} -> {windows}")
    ctx = SimpleNamespace(
        values=values,
        shape=shape,
        parameters=parameters,
        litgpt_config=litgpt_config,
        compile=args.compile == "on",
        threads=args.threads,
        venv=Path(args.venv),
        work=work,
        windows=windows,
        tokenizer_dir=tokenizer_dir,
        checksums=data["checksums"],
        tokens_per_step=shape.batch_size * shape.seq_len,
    )
    result = {
        "meta": {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "sets": sets,
            "config": os.path.relpath(args.config, REPO),
            "parameters": parameters,
            "litgpt_model_config": litgpt_config,
            "batch_size": shape.batch_size,
            "seq_len": shape.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads": args.threads,
            "compile": args.compile,
            "timing": "perf_counter/process_time at every step start "
            "inside the training process; tokens/s between the starts of steps warmup and warmup+steps",
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "lightning": lightning.__version__,
                "litgpt_env": have,
            },
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        },
        "precisions": {},
    }
    for precision in precisions:
        print(f"\n== {precision}: check runs (1 timed step each, not reported)")
        checks = {side: run_side(side, ctx, precision, "check", 1, 1) for side in ("ours", "litgpt")}
        print(
            f"parameters in the runs: ours {checks['ours']['parameters']:,}, "
            f"LitGPT {checks['litgpt']['parameters']:,}"
            f" (identical); first-step loss: ours {checks['ours']['first_loss']:.3f}, "
            f"LitGPT {checks['litgpt']['first_loss'] or float('nan'):.3f}; same input tokens in every batch"
        )
        runs = []
        for repeat in range(args.repeats):
            order = ("ours", "litgpt") if repeat % 2 == 0 else ("litgpt", "ours")
            pair = {side: run_side(side, ctx, precision, f"r{repeat}", args.warmup, args.steps) for side in order}
            runs.append({"first": order[0], **pair})
            print(
                f"repeat {repeat + 1}/{args.repeats} ({order[0]} first): ours {pair['ours']['tokens_per_sec']:,.0f}, "
                f"LitGPT {pair['litgpt']['tokens_per_sec']:,.0f} tokens/s "
                f"(processes {pair['ours']['process_s']:.0f} s, {pair['litgpt']['process_s']:.0f} s)",
                flush=True,
            )
        summary = summarize([r["ours"] for r in runs], [r["litgpt"] for r in runs])
        result["precisions"][precision] = {"checks": checks, "runs": runs, "summary": summary}
        print_precision(precision, runs, summary)
    result["meta"]["wall_s"] = time.time() - started
    for path in (Path(args.json), Path(args.png)):
        path.parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.png))
    print(f"\nwall time {result['meta']['wall_s']:.0f} s; JSON {args.json}, plot {args.png}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
