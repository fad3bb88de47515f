"""μP experiments: the coordinate check and the loss-vs-size fit (`coord-check`, `predict-loss`).

Both build models with the trainer's own `FLMLightningModule` (μP init and per-role AdamW groups
from `flm_lightning.mup`), so what they measure is what training uses.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch

from flm_lightning.errors import ConfigError, DataError
from flm_lightning.model import ModelConfig
from flm_lightning.mup import MuPConfig, with_base_width
from flm_lightning.optim import OptimConfig


# ---- widths -------------------------------------------------------------------------------------
def at_width(arch: ModelConfig, width: int) -> ModelConfig:
    """`arch` at hidden size `width`: head_dim fixed (heads scale), an explicit FFN size scales with it."""
    head = arch.head_size
    if width <= 0 or width % head:
        raise ConfigError(f"width {width} is not a positive multiple of the head size {head}")
    ffn = None if arch.ffn_hidden_size is None else max(1, round(arch.ffn_hidden_size * width / arch.hidden_size))
    return replace(arch, hidden_size=width, n_heads=width // head, head_dim=head, ffn_hidden_size=ffn)


def parse_widths(text: str) -> list[int]:
    try:
        widths = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        raise ConfigError(f"--widths must be comma-separated integers, got {text!r}") from None
    if len(widths) < 2:
        raise ConfigError(f"--widths needs at least two widths, got {text!r}")
    return widths


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# ---- coordinate check ---------------------------------------------------------------------------
def build_module(arch: ModelConfig, lr: float, mup: Optional[MuPConfig]):
    """The trainer's module and AdamW for `arch`: μP when `mup` is given, else standard
    parametrization (default init, one LR, logits times output_mult without the 1/r)."""
    from flm_lightning.module import FLMLightningModule  # Lightning import only when used

    arch = replace(arch, base_hidden_size=None) if mup is None else with_base_width(arch, mup)
    module = FLMLightningModule(arch=arch, optim=OptimConfig(lr=lr, warmup_steps=0, decay="constant"), mup=mup)
    module.configure_model()
    return module, module.build_optimizer()


def activation_scales(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Mean |x| of the embedding output, each block's output and the logits, and the logits."""
    scales: dict[str, float] = {}
    taps = [("embedding", model.tok_embeddings)] + [(f"block.{n}", layer) for n, layer in model.layers.items()]
    hooks = [
        module.register_forward_hook(lambda m, i, out, key=key: scales.__setitem__(key, out.abs().mean().item()))
        for key, module in taps
    ]
    try:
        logits = model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    scales["logits"] = logits.abs().mean().item()
    return scales, logits


def train_and_record(
    arch: ModelConfig, lr: float, mup: Optional[MuPConfig], tokens: torch.Tensor, steps: int, seed: int
) -> list[dict[str, float]]:
    """Activation scales at steps 0..steps of AdamW on one fixed batch (the coordinate check's run)."""
    torch.manual_seed(seed)
    module, optimizer = build_module(arch, lr, mup)
    model = module.model.train()
    records = []
    for step in range(steps + 1):
        scales, logits = activation_scales(model, tokens[:, :-1])
        records.append(scales)
        if step == steps:
            break
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return records


def coord_check(
    arch: ModelConfig,
    mup: MuPConfig,
    lr: float,
    widths: Sequence[int],
    steps: int = 5,
    batch_size: int = 8,
    seq_len: int = 64,
    seed: int = 0,
    progress=None,
) -> dict:
    """Train each width for `steps` AdamW steps with μP and with SP on the same fixed random-token
    batch; return per parametrization, width and layer the activation scale at every step and,
    per layer, the log-log slope of the last step's scale against width."""
    archs = {width: at_width(arch, width) for width in widths}  # every width checked before any training
    seq_len = min(seq_len, arch.max_seq_len)
    tokens = torch.randint(0, arch.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    result = {
        "widths": list(widths),
        "steps": steps,
        "lr": lr,
        "batch": [batch_size, seq_len],
        "base_hidden_size": with_base_width(arch, mup).base_hidden_size,
    }
    for name, cfg in (("mup", mup), ("sp", None)):
        per_width = {}
        for width in widths:
            per_width[str(width)] = train_and_record(archs[width], lr, cfg, tokens, steps, seed)
            if progress:
                progress(f"{name} width {width}: logits {per_width[str(width)][-1]['logits']:.4g}")
        layers = list(per_width[str(widths[0])][-1])
        slopes = {layer: loglog_slope(widths, [per_width[str(w)][-1][layer] for w in widths]) for layer in layers}
        result[name] = {"scales": per_width, "slopes": slopes}
    return result


def plot_coord_check(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, steps = result["widths"], result["steps"]
    columns = sorted({1, steps}) if steps > 1 else [steps]
    fig, axes = plt.subplots(2, len(columns), figsize=(5.5 * len(columns), 8), squeeze=False, sharey="row")
    for row, (name, title) in enumerate((("mup", "μP"), ("sp", "standard parametrization"))):
        scales = result[name]["scales"]
        for col, step in enumerate(columns):
            ax = axes[row][col]
            for layer in scales[str(widths[0])][step]:
                ys = [scales[str(w)][step][layer] for w in widths]
                ax.plot(
                    widths,
                    ys,
                    marker="o",
                    label=f"{layer} ({result[name]['slopes'][layer]:+.2f})" if step == steps else layer,
                )
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="width (hidden size)",
                ylabel="mean |activation|",
                title=f"{title}, step {step}",
            )
            ax.legend(fontsize=7, title="layer (slope at last step)" if step == steps else None, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- loss prediction ----------------------------------------------------------------------------
def fit_power_law(params: Sequence[float], losses: Sequence[float]) -> tuple[float, float, float]:
    """Fit L(N) = a * N^b + c (b < 0 expected) by least squares on L.

    For a fixed c the model is linear in log space (log(L - c) = log a + b log N); the outer
    search is over c in [0, min L): a coarse grid, then golden-section refinement around the best
    cell. No scipy; deterministic.
    """
    n, y = np.asarray(params, float), np.asarray(losses, float)
    if len(n) < 4:
        raise DataError(f"a power law with an offset needs at least 4 runs, got {len(n)}")
    if np.any(n <= 0) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise DataError("parameter counts and losses must be positive and finite")
    if len(set(n.tolist())) < len(n):
        raise DataError("two runs have the same parameter count")
    log_n = np.log(n)

    def solve(c: float) -> tuple[float, float, float]:
        b, log_a = np.polyfit(log_n, np.log(y - c), 1)
        residual = float(np.sum((np.exp(log_a) * n**b + c - y) ** 2))
        return residual, float(np.exp(log_a)), float(b)

    hi = float(y.min()) * (1 - 1e-9)
    grid = np.linspace(0.0, hi, 401)
    errors = [solve(c)[0] for c in grid]
    k = int(np.argmin(errors))
    lo_c, hi_c = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        x1, x2 = hi_c - g * (hi_c - lo_c), lo_c + g * (hi_c - lo_c)
        if solve(x1)[0] < solve(x2)[0]:
            hi_c = x2
        else:
            lo_c = x1
    c = (lo_c + hi_c) / 2
    _, a, b = solve(c)
    if not b < 0:
        raise DataError(f"the losses do not fall with size (fitted exponent b = {b:.3g} >= 0): check the runs")
    return a, b, c


def power_law(n: float, a: float, b: float, c: float) -> float:
    return a * n**b + c


def plot_prediction(points: list[dict], fit: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b, c = fit["a"], fit["b"], fit["c"]
    fitted = [p for p in points if p.get("used", True)]
    held = [p for p in points if not p.get("used", True)]
    target = fit["target_params"]
    ns = np.geomspace(min(p["params"] for p in points) / 1.3, max(target, *(p["params"] for p in points)) * 1.3, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ns, a * ns**b + c, color="gray", label=f"L(N) = {a:.3g} N^{b:.3f} + {c:.3f}")
    ax.scatter([p["params"] for p in fitted], [p["loss"] for p in fitted], color="C0", zorder=3, label="fitted runs")
    if held:
        ax.scatter(
            [p["params"] for p in held],
            [p["loss"] for p in held],
            color="C3",
            marker="s",
            zorder=3,
            label="held-out runs (actual)",
        )
    ax.scatter(
        [target],
        [fit["prediction"]],
        color="C1",
        marker="*",
        s=180,
        zorder=4,
        label=f"prediction {fit['prediction']:.4f}"
        + (f" (actual {fit['actual']:.4f}, error {fit['error_pct']:+.2f}%)" if fit.get("actual") else ""),
    )
    ax.set(
        xscale="log",
        xlabel="non-embedding parameters N",
        ylabel=fit.get("tag", "loss"),
        title=f"loss at step {fit['step']} against model size",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
