"""How a metric prints: from the kind and direction its task declares (`eval_info.metric_specs`).

| kind       | cell                         | header unit | bold best |
|------------|------------------------------|-------------|-----------|
| `fraction` | x 100, 2 decimals            | `%`         | yes       |
| `score`    | x 100, 2 decimals            | `×100`      | yes       |
| `count`    | integer (± only if it varies)| `count`     | never     |
| `rate`     | 2 decimals                   | `/s`        | yes       |
| `seconds`  | 2 decimals                   | `s`         | yes       |
| `loss`     | 4 decimals                   | (none)      | yes       |
| undeclared | 4 significant digits, as is  | (none)      | never     |

`score` is a correlation-type score in [-1, 1] (Matthews, Pearson): printed x 100 as GLUE and the paper
do, so that it averages with accuracies. Headers end in an arrow, `↑` (higher is better) or `↓`, when the
direction is declared (never on counts). A metric a result does not declare is printed as stored, never
scaled: a sample count or a throughput is never shown as a percentage.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from analysis.store import Stat
from astra.results import RunResult

EMPTY = "-"
# kind -> (scale, decimals, header unit)
KINDS: dict[str, tuple[float, int, str]] = {
    "fraction": (100.0, 2, "%"),
    "score": (100.0, 2, "×100"),
    "count": (1.0, 0, "count"),
    "rate": (1.0, 2, "/s"),
    "seconds": (1.0, 2, "s"),
    "loss": (1.0, 4, ""),
    "dimensions": (1.0, 2, ""),  # analysis-internal: effective ranks; results never declare it
}
DECLARED_KINDS = ("fraction", "score", "count", "rate", "seconds", "loss")  # what `metric_specs` may say


@dataclass(frozen=True)
class MetricSpec:
    """Kind and direction of one metric; `kind == ""` when no result declares it."""

    kind: str = ""
    higher_is_better: bool | None = None

    @classmethod
    def of(cls, entry: Any) -> MetricSpec:
        """From a `metric_specs` entry {"kind": ..., "higher_is_better": ...}; unknown kinds are undeclared."""
        if not isinstance(entry, dict) or entry.get("kind") not in DECLARED_KINDS:
            return cls()
        direction = entry.get("higher_is_better")
        return cls(str(entry["kind"]), bool(direction) if direction is not None else None)

    @property
    def scale(self) -> float:
        return KINDS[self.kind][0] if self.kind else 1.0

    @property
    def ranked(self) -> bool:
        """Whether a best value exists (bold): a declared direction on anything but a count."""
        return self.higher_is_better is not None and self.kind not in ("", "count")

    def arrow(self) -> str:
        if self.higher_is_better is None or self.kind in ("", "count"):
            return ""
        return "↑" if self.higher_is_better else "↓"

    def header(self, label: str) -> str:
        """`accuracy (%) ↑`, `n (count)`, `loss ↓`, or the bare label when undeclared."""
        unit = KINDS[self.kind][2] if self.kind else ""
        return " ".join(x for x in (label, f"({unit})" if unit else "", self.arrow()) if x)

    def number(self, value: float) -> str:
        """One value in this kind's format (no ± part)."""
        if not self.kind:
            return f"{value:.4g}"
        scale, digits, _ = KINDS[self.kind]
        return f"{value * scale:.{digits}f}"

    def cell(self, stat: Stat, seeds: int | None = None) -> str:
        """`mean ± std` (sample std over the runs), the mean alone for one run, `-` for none; a cell over
        fewer runs than its row's `seeds` says how many: `81.00 (n=1)`."""
        if stat.n == 0:
            return EMPTY
        text = self.number(stat.mean)
        if stat.n > 1 and not math.isnan(stat.std) and (stat.std or self.kind != "count"):
            text += f" ± {self.number(stat.std)}"  # a count equal in every run prints once
        if seeds is not None and stat.n < seeds:
            text += f" (n={stat.n})"
        return text


def spec_of(run: RunResult, metric: str) -> MetricSpec:
    """What `run` declares for its metric `metric`."""
    specs = getattr(run.eval_info, "metric_specs", None) or {}
    return MetricSpec.of(specs.get(metric))


def common_spec(entries: Iterable[tuple[RunResult, str]]) -> MetricSpec:
    """The spec most (run, metric key) pairs declare; undeclared when none does.

    Results of one metric agree unless a task changed its declaration between runs; the majority then
    wins rather than one stale file.
    """
    declared = Counter(spec for run, key in entries if (spec := spec_of(run, key)).kind)
    return declared.most_common(1)[0][0] if declared else MetricSpec()


def best_rows(means: Iterable[tuple[int, float]], spec: MetricSpec) -> set[int]:
    """Rows holding the best mean of a column (ties: all); none unless two rows have a value and the
    metric has a direction."""
    values = list(means)
    if len(values) < 2 or not spec.ranked:
        return set()
    top = max(v for _, v in values) if spec.higher_is_better else min(v for _, v in values)
    return {i for i, v in values if v == top}
