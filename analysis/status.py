"""`python -m analysis.status <sweep>` (`make status SWEEP=<name>`): the state of every run of a sweep's
view in the results store, read from the store alone.

A run of the view (a marker `<results_dir>/views/<sweep>/<signature>`, written when the run starts or is
skipped) is `present` (a successful result), `failed` (a failed or unreadable result), `running` (no
successful result, a live claim `<results_dir>/claims/<signature>.claim` is held) or `missing` (neither:
the run started and died without writing, or was never run; a stale claim -- its process gone on this
host, or older than the timeout -- does not count). A caller that expanded the sweep file (the
pipeline side) may pass the signatures it `expected`: those absent from the view count as `missing` too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.store import get
from astra.results import (
    RunResult,
    StoreError,
    claim_is_stale,
    claim_path,
    holder_text,
    read_claim,
    read_result,
    run_path,
    sweep_names,
    sweep_signatures,
)

STATES = ("present", "failed", "running", "missing")
# A claim older than this is stale whatever its host (the schema's default `sweep.claim_timeout_s`); a
# claim whose process is gone on this host is stale at once.
CLAIM_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class RunState:
    signature: str
    state: str  # present | failed | running | missing
    detail: str = ""  # error of a failed run, claim of a running one
    result: RunResult | None = None  # the stored result, when readable

    def describe(self) -> str:
        """`lora / glue/mrpc / seed 0` for a run with a result; `-` otherwise."""
        if self.result is None:
            return "-"
        return " / ".join(str(get(self.result, k)) for k in ("method.name", "task.name")) + (
            f" / seed {get(self.result, 'seed')}"
        )


def run_state(results_dir: str | Path, sig: str, claim_timeout_s: float = CLAIM_TIMEOUT_S) -> RunState:
    """State of the run with signature `sig` in the store: a live claim on a run without a successful
    result is `running` (a rerun of a failed run included); a stale claim counts for nothing."""
    path, claim = run_path(results_dir, sig), claim_path(results_dir, sig)
    result, problem = None, ""
    if path.exists():
        try:
            result = read_result(path)
        except StoreError as err:
            problem = f"unreadable result: {err}"
    holder = read_claim(claim)
    if claim.exists() and not claim_is_stale(claim, holder, claim_timeout_s) and not (result and result.ok):
        return RunState(sig, "running", f"claimed by {holder_text(holder)}", result)
    if problem:
        return RunState(sig, "failed", problem)
    if result is None:
        return RunState(sig, "missing")
    if result.ok:
        return RunState(sig, "present", "", result)
    lines = [line for line in result.run_info.error.strip().splitlines() if line.strip()]
    return RunState(sig, "failed", lines[-1] if lines else "status failed, no error recorded", result)


def sweep_status(
    results_dir: str | Path,
    sweep: str,
    expected: Iterable[str] = (),
    claim_timeout_s: float = CLAIM_TIMEOUT_S,
) -> list[RunState]:
    """Every run of the sweep's view (plus `expected` signatures), sorted by signature."""
    signatures = sweep_signatures(results_dir, sweep) | set(expected)
    return [run_state(results_dir, sig, claim_timeout_s) for sig in sorted(signatures)]


def counts_line(runs: Sequence[RunState]) -> str:
    counts = Counter(r.state for r in runs)
    return f"{len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)


def format_status(sweep: str, runs: Sequence[RunState]) -> str:
    lines = [f"sweep {sweep}: {counts_line(runs)}"]
    for run in runs:
        detail = f"  ({run.detail})" if run.detail else ""
        lines.append(f"  {run.state:<8} {run.signature:<12}  {run.describe()}{detail}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Which runs of a sweep are present, failed, running, missing."
    )
    parser.add_argument("sweep", help="name of a sweep view in the results store")
    parser.add_argument("--results-dir", default=os.environ.get("ASTRA_RESULTS_DIR", "results"))
    args = parser.parse_args(argv)
    names = sweep_names(args.results_dir)
    if args.sweep not in names:
        sys.exit(
            f"no view {args.sweep!r} in {Path(args.results_dir).resolve()}; views: {', '.join(names) or 'none'}"
        )
    runs = sweep_status(args.results_dir, args.sweep)
    print(format_status(args.sweep, runs))


if __name__ == "__main__":
    main()
