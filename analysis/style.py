"""One colour per method, the same in every figure; variants of a method (ablations) differ by line style.

Colours are derived, never hand-listed per method: `method_colors(methods)` walks the methods in
their stable order (`analysis.store.method_order`: the paper's methods first, then the rest by name)
and gives each the next colour of a fixed palette; the paper's methods always take the first slots,
so their colours do not depend on which other methods a figure shows. Past the palette, colours are
generated (golden-angle hues) and still distinct.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display

from matplotlib import pyplot as plt  # noqa: E402

from analysis.store import PAPER_METHODS, method_order  # noqa: E402

# Okabe-Ito colour-blind-safe colours then darker neutrals, in the order of `PAPER_METHODS`
# (full_ft dark grey, lora blue, ..., astra_code reddish purple, astra vermillion: the strongest last).
PALETTE = (
    "#404040", "#0072B2", "#7F3C8D", "#3B7F5A", "#009E73", "#56B4E9", "#E69F00", "#8C6D31", "#B8860B",
    "#CC79A7", "#D55E00", "#1B9E77", "#7570B3", "#E7298A", "#66A61E", "#A6761D", "#17BECF", "#BCBD22",
)  # fmt: skip
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 2)))


def generated_color(index: int) -> str:
    """A colour for palette overflow: hue stepped by the golden angle, fixed saturation and value."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.65, 0.75)
    return "#" + "".join(f"{round(255 * c):02X}" for c in (r, g, b))


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """A distinct colour for every method given (and for every paper method), by stable order."""
    colors: dict[str, str] = {}
    for index, method in enumerate(method_order([*PAPER_METHODS, *methods])):
        color = PALETTE[index] if index < len(PALETTE) else generated_color(index)
        while color in colors.values():  # a generated hue that rounds onto a used one
            index += len(PALETTE)
            color = generated_color(index)
        colors[method] = color
    return colors


def line_styles(labels: list[str], methods: Iterable[str] = ()) -> dict[str, tuple[str, object]]:
    """(colour, line style) per group label `method (axis=value, ...)`: colour by method, style by variant.

    `methods`: every method whose colour should stay fixed (e.g. all methods of the store); the
    methods of `labels` are always included.
    """
    colors = method_colors([*methods, *(label.split(" ")[0] for label in labels)])
    seen: dict[str, int] = {}
    styles = {}
    for label in labels:
        method = label.split(" ")[0]
        index = seen.get(method, 0)
        seen[method] = index + 1
        styles[label] = (shade(colors[method], 0.18 * (index % 4)), LINE_STYLES[index % len(LINE_STYLES)])
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
