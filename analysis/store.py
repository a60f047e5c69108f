"""Read-side view of the results store shared by tables, curves, status and the report.

Runs are grouped into table rows / plot lines: a group is one method plus the values of the config
fields that vary *within* that method across the runs (the ablation axes: `method.select`,
`method.rank`, `calib.n`, ...); seeds, tasks, models and fields that never change a result are not
axes. Means and standard deviations are over the runs of a group (seeds).
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astra.results import NON_RESULT_KEYS, RunResult, read_result

NOT_AXES = ("seed", "task", "model", "eval", *NON_RESULT_KEYS)
# Paper order of rows: baselines first, Astra last (as in the paper's tables).
METHOD_ORDER = (
    "full_ft", "lora", "dora", "olora", "pissa", "milora", "lora_ga", "corda", "eva", "astra_code", "astra",
)  # fmt: skip


def load_runs(results_dir: str | Path, sweep: str | None = None) -> list[RunResult]:
    """Every readable result under `results_dir` (or its `sweep` folder); unreadable files are reported."""
    root = Path(results_dir) / sweep if sweep else Path(results_dir)
    runs = []
    for path in sorted(root.rglob("*.json")) if root.exists() else []:
        if path.name.startswith("."):
            continue  # an atomic write in progress
        try:
            runs.append(read_result(path))
        except (OSError, ValueError) as err:
            print(f"[analysis] skipping unreadable result {path}: {err}", file=sys.stderr)
    return runs


def sweeps(runs: Iterable[RunResult]) -> list[str]:
    return sorted({r.run_info.sweep for r in runs})


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


def _is_axis(key: str) -> bool:
    return not any(key == k or key.startswith(f"{k}.") for k in NOT_AXES)


def ablation_axes(runs: Sequence[RunResult]) -> list[str]:
    """Dotted config keys whose value differs between two runs of the same method (sorted)."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_method[method_of(run)].append(flatten(run.run_info.config))
    axes = set()
    for flats in by_method.values():
        # a key some runs lack comes from a schema change (a field added later), not an ablation
        keys = set.intersection(*(set(f) for f in flats)) if flats else set()
        axes |= {k for k in keys if _is_axis(k) and len({repr(f[k]) for f in flats}) > 1}
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
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


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
    for run in runs:
        by_cell[(get(run, "task.name"), get(run, "model.name"))].append(flatten(run.run_info.config))
    keys = set()
    for flats in by_cell.values():
        union = set().union(*flats)
        skip = ("seed", *NON_RESULT_KEYS)
        keys |= {
            k for k in union
            if not any(k == s or k.startswith(f"{s}.") for s in skip) and len({repr(f.get(k)) for f in flats}) > 1
        }  # fmt: skip
    return sorted(keys)
