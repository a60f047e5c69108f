"""Training-loss and gradient-norm curves per method (mean and ±1 std band over seeds), as in App. D.2,
and effective rank against step from the rank probes. One figure per sweep, one row per task.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from analysis.store import get, group_runs, method_of
from analysis.style import line_styles, new_figure, paper_style, plt, shared_legend
from astra.erank import MODULE_ORDER, by_module_type
from astra.results import RunResult

CURVE_KEYS = ("loss", "grad_norm")


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's smoothing); weight 0 = identity."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc = np.empty_like(values, dtype=float), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def aligned(runs: Sequence[RunResult], key: str, smooth: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(steps (T,), values (seeds, T)) of `key` on the steps every run logged; each run smoothed first."""
    series = []
    for run in runs:
        rows = [r for r in run.train_info.history if r.get(key) is not None]
        series.append({int(r["step"]): float(r[key]) for r in rows})
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[t] for t in common] for s in series], dtype=float).reshape(len(series), len(common))
    if smooth and common:
        values = np.stack([ema(v, smooth) for v in values])
    return np.array(common), values


def _ylabel(key: str, runs: Sequence[RunResult]) -> str:
    if key == "grad_norm":
        return "grad norm (L2, pre-clip)"
    if all(get(r, "task.num_labels") == 1 for r in runs):
        return "loss (MSE)"
    if all(get(r, "task.head") == "seq_cls" for r in runs):  # one label per sequence
        return "loss (CE, nats/example)"
    return "loss (CE, nats/token)"  # causal LM on response tokens


def plot_band(ax: plt.Axes, steps: np.ndarray, values: np.ndarray, label: str, style: tuple) -> None:
    """Mean line and ±1 std band (band only with two or more seeds)."""
    color, linestyle = style
    mean = values.mean(axis=0)
    n = values.shape[0]
    ax.plot(steps, mean, color=color, linestyle=linestyle, linewidth=1.6, label=f"{label} (n={n})")
    if n > 1:
        std = values.std(axis=0, ddof=1)
        # never below the smallest seed: keeps the band positive on log axes (grad-norm)
        lower = np.maximum(mean - std, values.min(axis=0))
        ax.fill_between(steps, lower, mean + std, color=color, alpha=0.18, linewidth=0)


def _tasks(runs: Sequence[RunResult]) -> list[str]:
    return sorted({str(get(r, "task.name")) for r in runs})


def plot_curves(
    runs: Sequence[RunResult], path: Path, title: str, smooth: float = 0.0, methods: Iterable[str] = ()
) -> Path | None:
    """Loss (left) and grad-norm (right) per group, one row per task; None when no run has a history.

    `methods`: every method whose colour must match other figures (see `analysis.style.line_styles`).
    """
    tasks = [t for t in _tasks(runs) if any(r.train_info.history for r in runs if get(r, "task.name") == t)]
    if not tasks:
        return None
    with paper_style():
        fig, axes = new_figure(len(tasks), len(CURVE_KEYS))
        for row, task in enumerate(tasks):
            groups = group_runs([r for r in runs if get(r, "task.name") == task and r.train_info.history])
            styles = line_styles(list(groups), methods)
            for col, key in enumerate(CURVE_KEYS):
                ax = axes[row * len(CURVE_KEYS) + col]
                for label, members in groups.items():
                    steps, values = aligned(members, key, smooth)
                    if steps.size:
                        plot_band(ax, steps, values, label, styles[label])
                ax.set_xlabel("optimisation step")
                ax.set_ylabel(_ylabel(key, [r for m in groups.values() for r in m]))
                ax.set_title(f"{task}: {'training loss' if key == 'loss' else 'gradient norm'}")
                if key == "grad_norm":
                    ax.set_yscale("log")  # early spikes span orders of magnitude
                else:
                    ax.ticklabel_format(axis="y", useOffset=False)
        smooth_note = f", EMA smoothing {smooth}" if smooth else ""
        save_figure(fig, axes, f"{title} (mean ± 1 std over seeds{smooth_note})", path)
    return path


def save_figure(fig: plt.Figure, axes: list, suptitle: str, path: Path) -> None:
    """Title, layout, one legend below the panels, PNG at `path`; the figure is closed."""
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    shared_legend(fig, axes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


RANK_QUANTITIES = {"update": "ΔW = W_t − W_0", "adapter": "adapter s·BA", "output_cov": "output covariance"}


def rank_series(runs: Sequence[RunResult], quantity: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values (seeds, T)): erank averaged over module types, on the steps every run probed."""
    series = []
    for run in runs:
        points = {}
        for probe in run.train_info.rank_probes:
            kinds = by_module_type(probe.get(quantity) or {})
            if kinds:
                points[int(probe["step"])] = float(
                    np.mean([kinds[k] for k in kinds if k in (*MODULE_ORDER, "other")])
                )
        series.append(points)
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[t] for t in common] for s in series], dtype=float).reshape(len(series), len(common))
    return np.array(common), values


def plot_rank_probes(
    runs: Sequence[RunResult], path: Path, title: str, methods: Iterable[str] = ()
) -> Path | None:
    """Effective rank against step per group, one panel per probed quantity; None without probes."""
    probed = [r for r in runs if r.train_info.rank_probes]
    quantities = [
        q for q in RANK_QUANTITIES if any(p.get(q) for r in probed for p in r.train_info.rank_probes)
    ]
    if not quantities:
        return None
    groups = group_runs(probed)
    styles = line_styles(list(groups), methods)
    with paper_style():
        fig, axes = new_figure(1, len(quantities))
        for ax, quantity in zip(axes, quantities, strict=True):
            for label, members in groups.items():
                steps, values = rank_series(members, quantity)
                if steps.size:
                    plot_band(ax, steps, values, label, styles[label])
                    ax.scatter(steps, values.mean(axis=0), color=styles[label][0], s=12, zorder=3)
            ax.set_xlabel("optimisation step")
            ax.set_ylabel("effective rank (dimensions)")
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_title(f"erank of {RANK_QUANTITIES[quantity]}")
        save_figure(fig, axes, f"{title} (mean over layers; mean ± 1 std over seeds)", path)
    return path


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def sweep_figures(
    runs: Sequence[RunResult], sweep: str, out_dir: Path, smooth: float = 0.0, methods: Iterable[str] = ()
) -> list[Path]:
    """`<sweep>[__<model>]_curves.png` and `_rank.png` (when probed) for one sweep's runs, one per model."""
    methods = {*methods, *(method_of(r) for r in runs)}
    models = sorted({str(get(r, "model.name")) for r in runs})
    written = []
    for model in models:
        model_runs = [r for r in runs if str(get(r, "model.name")) == model and r.ok]
        stem = safe_name(f"{sweep}__{model}" if len(models) > 1 else sweep)
        title = f"{sweep} / {model}"
        written.append(plot_curves(model_runs, out_dir / f"{stem}_curves.png", title, smooth, methods))
        written.append(plot_rank_probes(model_runs, out_dir / f"{stem}_rank.png", title, methods))
    return [p for p in written if p is not None]
