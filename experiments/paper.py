"""The paper's tables and figures as code: which sweep produces which, and how complete each is.

`python -m experiments.paper` prints, per paper item, its sweep file, how many of the sweep's runs are
present / failed / missing, and the regenerated table from the results store (`-` for missing cells).
Run a sweep with `make sweep SWEEP=<name>`; regenerate everything with `make tables` / `make report`.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from analysis.status import expected_runs
from analysis.tables import (
    Table,
    ablation_calib_table,
    ablation_rank_table,
    ablation_select_table,
    commonsense_table,
    glue_table,
    math_code_table,
    rank_table,
)
from astra.results import read_result


@dataclass(frozen=True)
class PaperItem:
    name: str
    sweep: str  # conf/sweep/<sweep>.yaml
    table: Callable[[Sequence], Table | None]
    figures: str = ""  # files `make tables` writes for it under results/figures/


PAPER: tuple[PaperItem, ...] = (
    PaperItem("GLUE table (DeBERTa-v3-base)", "glue_table1", glue_table, "glue_table1_curves.png"),
    PaperItem(
        "Math and code table (LLaMA-2-7B)", "nlg_math_code", math_code_table, "nlg_math_code_curves.png"
    ),
    PaperItem("Commonsense table (LLaMA-3-8B)", "commonsense", commonsense_table, "commonsense_curves.png"),
    PaperItem("Ablation: eigenvector selection", "ablation_select", ablation_select_table),
    PaperItem("Ablation: rank", "ablation_rank", ablation_rank_table),
    PaperItem("Ablation: calibration data", "ablation_calib", ablation_calib_table),
    PaperItem("Effective rank of dW (discussion)", "glue_table1", rank_table, "glue_table1_rank.png"),
    PaperItem(
        "Loss and grad-norm curves (App. D.2)", "glue_table1", lambda runs: None, "glue_table1_curves.png"
    ),
)


def describe(item: PaperItem, extra: Sequence[str] = ()) -> str:
    """Status line of one paper item and its table over the runs of its sweep that are present."""
    runs = expected_runs(item.sweep, extra)
    counts = Counter(r.state for r in runs)
    lines = [f"## {item.name}: sweep `{item.sweep}`, {len(runs)} runs: "
             + ", ".join(f"{counts[s]} {s}" for s in ("present", "failed", "missing", "invalid"))]  # fmt: skip
    present = [read_result(r.path) for r in runs if r.state == "present"]
    table = item.table(present) if present else None
    if table is not None and table.has_values():
        lines.append(table.to_markdown())
    if item.figures:
        lines.append(f"figure: results/figures/{item.figures} (`make tables`)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Paper items, their sweeps and how complete they are.")
    parser.add_argument("--only", default=None, help="substring of the item or sweep name")
    args = parser.parse_args(argv)
    for item in PAPER:
        if not args.only or args.only in item.name or args.only == item.sweep:
            print(describe(item) + "\n")


if __name__ == "__main__":
    main()
