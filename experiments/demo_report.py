"""`python -m experiments.demo_report` (end of `make demo`): the demo sweep's results table and curves.

Prints, for the runs `conf/sweep/demo.yaml` expects, method x metrics (mean ± std over seeds, in
percent), init time and trainable parameters, with `-` where a run is missing or failed; writes the
loss / grad-norm figure to `<results>/figures/demo_curves.png`. Result files in `results/demo/` that the
current sweep file does not expect (e.g. from an edited demo.yaml) are left out and counted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.curves import plot_curves
from analysis.status import expected_runs
from analysis.store import ablation_axes, group_label
from analysis.tables import sweep_table
from astra.results import read_result

SWEEP = "demo"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the demo results table and write its curves.")
    parser.add_argument("overrides", nargs="*", help="the overrides `astra-run sweep=demo` was given, if any")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for the curves")
    args = parser.parse_args(argv)
    expected = expected_runs(SWEEP, args.overrides)
    present = [read_result(r.path) for r in expected if r.state == "present"]
    failed = [r for r in expected if r.state in ("failed", "invalid")]
    missing = [r for r in expected if r.state == "missing"]
    axes = ablation_axes(present)
    labels = sorted({r.method for r in expected if r.method} - {group_label(p, axes) for p in present})
    table = sweep_table(present, expected=labels, name=SWEEP)
    table.title = f"Demo ({len(present)}/{len(expected)} runs present)"
    print(table.to_markdown())
    for run in failed:
        print(f"{run.state}: {' '.join(run.overrides)}: {run.detail}")
    if missing:
        print(f"missing: {len(missing)} run(s); `make status SWEEP={SWEEP}` lists them")
    if not present:
        sys.exit("no successful demo run in the results store: run `make demo` first")
    results_dir = next(
        Path(r.path) for r in expected if r.path
    ).parent.parent  # <results_dir>/<sweep>/<sig>.json
    figure = plot_curves(present, results_dir / "figures" / f"{SWEEP}_curves.png", "demo", args.smooth)
    if figure:
        print(f"curves: {figure}")


if __name__ == "__main__":
    main()
