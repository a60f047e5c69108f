"""The paper's tables and figures as code: the single map from each paper item to its sweeps and table.

`python -m experiments.paper` prints, per paper item, the state of the runs of its sweeps' views in the
results store (`analysis.status`) and its table regenerated from them (`-` for missing cells).
`python -m experiments.paper --sweeps <id> [--scale mini]` prints the sweep names of one item, one a
line (what `make reproduce TABLE=<id>` runs with `astra-run -m sweep=<name>`, finished runs skipped);
`python -m experiments.paper --table <id>` then writes its table (Markdown, LaTeX) and figures.

`sweeps` are the paper-scale sweep files (`conf/sweep/<name>.yaml`); `mini` their CPU-scale
counterparts, when one exists. Sweep membership is read from the store's views, never by expanding
the sweep files here, so this module needs only `analysis` and the store.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.curves import plot_curves, plot_rank_probes, safe_name
from analysis.status import counts_line, sweep_status
from analysis.store import load_runs, method_of, runs_by_view
from analysis.tables import (
    Table,
    ablation_calib_table,
    ablation_rank_table,
    ablation_select_table,
    commonsense_table,
    comparison_table,
    glue_table,
    math_code_table,
    rank_table,
    write_table,
)
from astra.results import RunResult

FIGURES = ("curves", "rank")  # loss / grad-norm curves (App. D.2); effective rank against step


@dataclass(frozen=True)
class PaperItem:
    id: str  # `make reproduce TABLE=<id>`
    name: str
    sweeps: tuple[str, ...]  # paper-scale sweep files, conf/sweep/<name>.yaml
    table: Callable[[Sequence[RunResult]], Table | None] | None = None
    figures: tuple[str, ...] = ()  # subset of FIGURES
    mini: tuple[str, ...] = ()  # CPU-scale counterparts, when they exist
    paired: str = ""  # table family whose cells the "Astra vs X" paired tests run over (analysis.compare)

    def sweep_list(self, scale: str = "paper") -> tuple[str, ...]:
        return self.mini if scale == "mini" else self.sweeps


PAPER: tuple[PaperItem, ...] = (
    PaperItem("glue", "GLUE table (DeBERTa-v3-base)", ("glue_table1",), glue_table, ("curves",), ("mini_glue",),
              "glue"),
    PaperItem("math_code", "Math and code table (LLaMA-2-7B)",
              ("nlg_math", "nlg_math_release", "nlg_code", "nlg_code_release"), math_code_table, ("curves",),
              ("mini_nlg",), "math_code"),
    PaperItem("commonsense", "Commonsense table (LLaMA-3-8B)", ("commonsense", "commonsense_release"),
              commonsense_table, ("curves",), paired="commonsense"),
    PaperItem("ablation_select", "Ablation: eigenvector selection", ("ablation_select",), ablation_select_table,
              mini=("mini_select",)),
    PaperItem("ablation_rank", "Ablation: rank", ("ablation_rank",), ablation_rank_table),
    PaperItem("ablation_calib", "Ablation: calibration data", ("ablation_calib",), ablation_calib_table,
              mini=("mini_calib",)),
    PaperItem("erank", "Effective rank of dW (discussion)", ("glue_table1",), rank_table, ("rank",), ("mini_glue",)),
    PaperItem("curves", "Loss and grad-norm curves (App. D.2)", ("glue_table1",), None, ("curves",),
              ("mini_glue", "mini_nlg")),
)  # fmt: skip


def item(item_id: str) -> PaperItem:
    for candidate in PAPER:
        if candidate.id == item_id:
            return candidate
    raise SystemExit(f"unknown paper item {item_id!r}; valid: {', '.join(p.id for p in PAPER)}")


def item_runs(results_dir: str | Path, paper_item: PaperItem, scale: str = "paper") -> list[RunResult]:
    """Runs of the item's sweep views (a run shared by two of them once), in signature order."""
    views = runs_by_view(results_dir, paper_item.sweep_list(scale))
    runs = {r.run_info.signature: r for members in views.values() for r in members}
    return [runs[sig] for sig in sorted(runs)]


def write_item(
    results_dir: str | Path, paper_item: PaperItem, out_dir: Path, scale: str = "paper"
) -> list[Path]:
    """The item's table (`<out>/tables/paper_<id>.md|.tex`) and figures (`<out>/figures/paper_<id>_*.png`)."""
    runs = [r for r in item_runs(results_dir, paper_item, scale) if r.ok]
    methods = sorted({method_of(r) for r in load_runs(results_dir)})  # colours as in every other figure
    written: list[Path] = []
    table = paper_item.table(runs) if paper_item.table and runs else None
    if table is not None and table.has_values():
        table.name = f"paper_{paper_item.id}"
        written += write_table(table, out_dir / "tables")
    paired = comparison_table(runs, paper_item.paired) if paper_item.paired else None
    if paired is not None:
        paired.name = f"paper_{paper_item.id}_paired"
        written += write_table(paired, out_dir / "tables")
    stem = out_dir / "figures" / safe_name(f"paper_{paper_item.id}")
    if "curves" in paper_item.figures:
        written.append(plot_curves(runs, Path(f"{stem}_curves.png"), paper_item.name, methods=methods))
    if "rank" in paper_item.figures:
        written.append(plot_rank_probes(runs, Path(f"{stem}_rank.png"), paper_item.name, methods=methods))
    return [p for p in written if p is not None]


def describe(results_dir: str | Path, paper_item: PaperItem, scale: str = "paper") -> str:
    """State of the runs of the item's sweeps and its table over the successful ones."""
    lines = [f"## {paper_item.name} (`{paper_item.id}`)"]
    sweeps = paper_item.sweep_list(scale)
    if not sweeps:
        return "\n".join([*lines, f"no {scale}-scale sweep for this item"])
    for sweep in sweeps:
        states = sweep_status(results_dir, sweep)
        lines.append(
            f"- sweep `{sweep}`: {counts_line(states) if states else 'no view in the store (not run yet)'}"
        )
    runs = [r for r in item_runs(results_dir, paper_item, scale) if r.ok]
    table = paper_item.table(runs) if paper_item.table and runs else None
    if table is not None and table.has_values():
        lines.append("\n" + table.to_markdown())
    paired = comparison_table(runs, paper_item.paired) if paper_item.paired else None
    if paired is not None:
        lines.append("\n" + paired.to_markdown())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Paper items, their sweeps and their tables from the store.")
    parser.add_argument("--results-dir", default=os.environ.get("ASTRA_RESULTS_DIR", "results"))
    parser.add_argument(
        "--scale", choices=("paper", "mini"), default="paper", help="paper-scale or CPU-scale sweeps"
    )
    parser.add_argument("--sweeps", metavar="ID", help="print the sweeps of one item, one a line")
    parser.add_argument("--table", metavar="ID", help="write the table and figures of one item")
    parser.add_argument("--out", default=None, help="output folder of --table (default: results dir)")
    parser.add_argument("--list", action="store_true", help="print the item ids")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{p.id}\t{p.name}" for p in PAPER))
    elif args.sweeps:
        print("\n".join(item(args.sweeps).sweep_list(args.scale)))
    elif args.table:
        chosen = item(args.table)
        written = write_item(args.results_dir, chosen, Path(args.out or args.results_dir), args.scale)
        if not written:
            sys.exit(f"no successful run of {chosen.id} in {Path(args.results_dir).resolve()}")
        print("\n".join(map(str, written)))
    else:
        print("\n\n".join(describe(args.results_dir, p, args.scale) for p in PAPER))


if __name__ == "__main__":
    main()
