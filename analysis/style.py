"""One colour per method, the same in every figure; variants of a method (ablations) differ by line style."""

from __future__ import annotations

import hashlib

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display

from matplotlib import pyplot as plt  # noqa: E402

# Okabe-Ito colour-blind-safe palette plus neutral shades; Astra gets the strongest colour.
METHOD_COLORS: dict[str, str] = {
    "astra": "#D55E00",  # vermillion
    "astra_code": "#CC79A7",  # reddish purple
    "lora": "#0072B2",  # blue
    "pissa": "#009E73",  # bluish green
    "lora_ga": "#E69F00",  # orange
    "milora": "#56B4E9",  # sky blue
    "dora": "#7F3C8D",  # purple
    "corda": "#8C6D31",  # brown
    "olora": "#3B7F5A",  # dark green
    "eva": "#B8860B",  # dark goldenrod
    "full_ft": "#404040",  # dark grey
}
FALLBACK = ("#1B9E77", "#7570B3", "#E7298A", "#66A61E", "#A6761D", "#666666", "#17BECF", "#BCBD22")
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 2)))


def method_color(method: str) -> str:
    """A method's colour; methods not in the table get a stable colour from a hash of the name."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK[int(hashlib.md5(method.encode()).hexdigest(), 16) % len(FALLBACK)]


def line_styles(labels: list[str]) -> dict[str, tuple[str, object]]:
    """(colour, line style) per group label `method (axis=value, ...)`: colour by method, style by variant."""
    seen: dict[str, int] = {}
    styles = {}
    for label in labels:
        method = label.split(" ")[0]
        index = seen.get(method, 0)
        seen[method] = index + 1
        styles[label] = (
            shade(method_color(method), 0.18 * (index % 4)),
            LINE_STYLES[index % len(LINE_STYLES)],
        )
    return styles


def shade(color: str, amount: float) -> str:
    """`color` blended towards white by `amount` in [0, 1): variants stay recognisably one method."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(c + (255 - c) * amount):02X}" for c in (r, g, b))


def shared_legend(fig: plt.Figure, axes: list) -> None:
    """One legend for the whole figure, below the panels, so it never hides a curve."""
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        ncol = min(len(labels), 3 if max(map(len, labels)) > 24 else 5)
        fig.legend([handles[x] for x in labels], labels, loc="lower center", ncol=ncol, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))  # fmt: skip
        rows = -(-len(labels) // ncol)
        height = fig.get_figheight()  # inches: x-axis label (~0.55 in) plus ~0.22 in per legend row
        fig.subplots_adjust(bottom=min(0.5, (0.55 + 0.22 * rows) / height))


def paper_rc() -> dict[str, object]:
    """Matplotlib settings legible at single-column paper width."""
    return {
        "font.size": 10,
        "axes.titlesize": 10,
        "axes.labelsize": 10,
        "legend.fontsize": 8,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
    }


def paper_style() -> object:
    """Context manager: wrap a whole figure (creation, plotting, saving) so the settings apply."""
    return plt.rc_context(paper_rc())


def new_figure(rows: int, cols: int, width: float = 3.6, height: float = 2.9) -> tuple[plt.Figure, list]:
    """A (rows x cols) grid of axes, each `width` x `height` inches; returns (figure, flat list of axes)."""
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, [ax for row in axes for ax in row]
