"""Read-side view of the results store shared by tables, curves, status and the report.

Store layout (written by the pipeline, `astra.results`): `<results_dir>/runs/<signature>.json` holds one
typed result per signature; `<results_dir>/views/<sweep>/<signature>` are empty markers, one per run a
sweep expanded to; `<results_dir>/claims/<signature>.claim` marks a run in progress. A sweep is the set
of its markers, so a run shared by two sweeps is one file read by both.

Runs are grouped into table rows / plot lines: a group is one method plus the values of the config
fields that vary *within* that method across the runs (the ablation axes: `method.select`,
`method.rank`, `calib.n`, ...); seeds, tasks, models and fields that never change a result are not
axes. Means and standard deviations are over the runs of a group (seeds).

Method order (rows, legends) is derived from the names present: the paper's methods first in the
paper's order (`PAPER_METHODS`, checked against the method registry by the tests), then any other
method alphabetically -- a new method is never left out, it comes after the paper's.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astra.results import RunResult, sweep_names, sweep_signatures
from astra.results import load_runs as load_store

# never ablation axes: what varies across the cells of a table, and Hydra's own settings; each run's
# `run_info.unsigned` paths (fields that cannot change a result) are left out as well
NOT_AXES = ("seed", "task", "model", "eval", "hydra")
# The paper's rows, baselines first and Astra last as in its tables. Only an ordering preference: a
# method missing here still gets a row, a colour and a position (after these, alphabetically).
PAPER_METHODS = (
    "full_ft", "lora", "dora", "olora", "pissa", "milora", "lora_ga", "corda", "eva", "astra_code", "astra",
)  # fmt: skip


def load_runs(results_dir: str | Path, sweep: str | None = None) -> list[RunResult]:
    """Every trustworthy result of the store (or of one sweep's view); a file that cannot be read or
    verified is named on stderr and left out, so one bad file never hides a table."""
    return load_store(results_dir, sweep, strict=False)


def runs_by_view(results_dir: str | Path, sweeps: Iterable[str] | None = None) -> dict[str, list[RunResult]]:
    """The runs of each sweep view (default: every view), every result file read once; a run shared
    by two views appears in both lists."""
    everything = {r.run_info.signature: r for r in load_runs(results_dir)}
    names = sweep_names(results_dir) if sweeps is None else list(sweeps)
    return {
        sweep: [everything[sig] for sig in sorted(sweep_signatures(results_dir, sweep)) if sig in everything]
        for sweep in names
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples so values are hashable."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def get(run: RunResult, dotted: str, default: Any = None) -> Any:
    """A field of the run's resolved config by dotted name."""
    node: Any = run.run_info.config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def method_of(run: RunResult) -> str:
    return str(get(run, "method.name", "?"))


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in prefixes)


def ablation_axes(runs: Sequence[RunResult]) -> list[str]:
    """Dotted config keys whose value differs between two runs of the same method (sorted)."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    unsigned: set[str] = set()
    for run in runs:
        by_method[method_of(run)].append(flatten(run.run_info.config))
        unsigned.update(run.run_info.unsigned)
    axes = set()
    for flats in by_method.values():
        # a key some runs lack comes from a schema change (a field added later), not an ablation
        keys = set.intersection(*(set(f) for f in flats)) if flats else set()
        axes |= {
            k for k in keys if not _under(k, (*NOT_AXES, *unsigned)) and len({repr(f[k]) for f in flats}) > 1
        }
    return sorted(axes)


def _short(key: str, axes: Sequence[str]) -> str:
    """The shortest dotted suffix of `key` that no other axis shares (`method.rank` -> `rank`)."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if sum(a == suffix or a.endswith(f".{suffix}") for a in axes) == 1:
            return suffix
    return key


def group_label(run: RunResult, axes: Sequence[str]) -> str:
    """`astra` or `astra (rank=16, select=head)`: the method plus its values on the ablation axes."""
    values = [f"{_short(k, axes)}={_fmt_value(get(run, k))}" for k in axes if get(run, k) is not None]
    return f"{method_of(run)} ({', '.join(values)})" if values else method_of(run)


def _fmt_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: paper methods by their paper position, every other method after them by name."""
    return (PAPER_METHODS.index(method) if method in PAPER_METHODS else len(PAPER_METHODS), method)


def method_order(methods: Iterable[str]) -> list[str]:
    """Distinct method names in row / legend order (see the module docstring)."""
    return sorted(set(methods), key=method_rank)


def group_runs(runs: Sequence[RunResult], axes: Sequence[str] | None = None) -> dict[str, list[RunResult]]:
    """Successful runs by group label, in paper method order then natural order of the axis values."""
    axes = ablation_axes(runs) if axes is None else axes
    groups: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        if run.ok:
            groups[group_label(run, axes)].append(run)
    return {label: groups[label] for label in ordered(groups)}


def ordered(labels: Iterable[str]) -> list[str]:
    """Group labels in paper method order, then natural order of their axis values (rank=4 < rank=16)."""
    return sorted(labels, key=lambda label: (method_rank(label.split(" ")[0]), _natural(label)))


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof = 1) of the values of one cell; n = 0 is an empty cell."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        if not xs:
            return cls()
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan, len(xs))


def mixed_keys(runs: Sequence[RunResult]) -> list[str]:
    """Result-changing config keys (seed aside) that differ between runs of the same task and model.

    Non-empty means a group pools runs made with different settings (e.g. stale results of an edited
    sweep file), so its mean is not one experiment's: tables and reports say so.
    """
    by_cell: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    skip = {"seed", "hydra"}
    for run in runs:
        by_cell[(get(run, "task.name"), get(run, "model.name"))].append(flatten(run.run_info.config))
        skip.update(run.run_info.unsigned)
    keys = set()
    for flats in by_cell.values():
        union = set().union(*flats)
        keys |= {k for k in union if not _under(k, skip) and len({repr(f.get(k)) for f in flats}) > 1}
    return sorted(keys)
