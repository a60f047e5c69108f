"""`python -m experiments.demo_report` (end of `make demo`): the demo sweep's results table and curves.

Prints, for the runs of the `demo` view of the results store, method x metrics (mean ± std over
seeds, each metric in its declared kind's format), init time and trainable parameters, with `-` where
a method has no successful run; lists failed, running and missing runs; writes the loss / grad-norm
figure to `<results>/figures/demo_curves.png`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.curves import plot_curves
from analysis.status import counts_line, sweep_status
from analysis.store import load_runs, method_of
from analysis.tables import sweep_table

SWEEP = "demo"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the demo results table and write its curves.")
    parser.add_argument("--results-dir", default=os.environ.get("ASTRA_RESULTS_DIR", "results"))
    parser.add_argument("--sweep", default=SWEEP, help="the view to report (default: demo)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for the curves")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    states = sweep_status(results_dir, args.sweep)
    present = [s.result for s in states if s.state == "present" and s.result is not None]
    # a method whose every run failed still gets its row of `-`
    failed_methods = sorted({method_of(s.result) for s in states if s.result is not None and not s.result.ok})
    table = sweep_table(present, expected=failed_methods, name=args.sweep)
    table.title = f"Demo `{args.sweep}`: {counts_line(states)}"
    print(table.to_markdown())
    for state in states:
        if state.state != "present":
            print(f"{state.state}: {state.signature} {state.describe()} {state.detail}".rstrip())
    if not present:
        sys.exit(
            f"no successful run in the view {args.sweep!r} of {results_dir.resolve()}: run `make demo` first"
        )
    methods = {method_of(r) for r in load_runs(results_dir)}
    path = results_dir / "figures" / f"{args.sweep}_curves.png"
    figure = plot_curves(present, path, args.sweep, args.smooth, methods)
    if figure:
        print(f"curves: {figure}")


if __name__ == "__main__":
    main()
