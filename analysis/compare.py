"""Paired comparisons behind each "Astra vs X" claim: the two methods' runs matched on (benchmark, seed).

For rows A and B of a benchmark table, every (column, seed) where both have a value is one pair; the
difference is `A - B` in the column's display unit (percentage points for fractions), signed so that a
positive difference means A is better (a lower-is-better metric is negated). Reported per comparison:
the number of pairs, wins / ties / losses of A, the mean difference ± its sample std, and two-sided
p-values of

- the exact **sign test** (binomial, ties dropped): does A win more often than chance;
- the **sign-flip permutation test** of the mean difference (exact over all 2^n sign patterns for
  n <= 16 pairs, else 20,000 random patterns with a fixed seed): is the mean difference non-zero.

Pairs across tasks of one seed share nothing but the seed, so both tests treat pairs as exchangeable;
with few pairs (e.g. 3 seeds x 1 task) no p-value can fall below 0.25: the table says so by its numbers.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.formats import EMPTY, MetricSpec
from analysis.store import get
from astra.results import RunResult

# Methods whose paper claim is "beats the others": each is compared with every other row present.
# Checked against the method registry by the tests.
CHALLENGERS = ("astra", "astra_code")
EXACT_MAX_PAIRS = 16
MONTE_CARLO_DRAWS = 20_000


@dataclass(frozen=True)
class Paired:
    """Differences (n,) of A over B, positive = A better, in display units."""

    diffs: tuple[float, ...]

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.diffs)

    @property
    def losses(self) -> int:
        return sum(d < 0 for d in self.diffs)

    @property
    def ties(self) -> int:
        return len(self.diffs) - self.wins - self.losses


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` under p = 1/2 (ties dropped); 1 for none."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_p(diffs: Sequence[float], draws: int = MONTE_CARLO_DRAWS, seed: int = 0) -> float:
    """Two-sided p-value of the mean of `diffs` (n,) under random signs (H0: symmetric around 0)."""
    x = np.asarray(diffs, dtype=float)
    if x.size == 0 or not np.any(x):
        return 1.0
    if x.size <= EXACT_MAX_PAIRS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=x.size)))  # (2^n, n)
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, x.size))
    means = np.abs(signs @ x) / x.size  # (patterns,)
    observed = abs(x.mean())
    return float(np.mean(means >= observed * (1 - 1e-12)))  # round-off must not drop the observed pattern


def paired(
    a: Sequence[RunResult], b: Sequence[RunResult], values: Sequence, specs: Sequence[MetricSpec]
) -> Paired:
    """Pairs of `a` over `b` on every (column, seed) both have; `values[j](run)` is column j's value or
    None, `specs[j]` its kind and direction (columns without a direction are skipped)."""

    def by_seed(runs: Sequence[RunResult], j: int) -> dict[str, float]:
        cells: dict[str, list[float]] = defaultdict(list)
        for run in runs:
            if (v := values[j](run)) is not None:
                cells[repr(get(run, "seed"))].append(v)
        return {seed: statistics.fmean(vs) for seed, vs in cells.items()}

    diffs = []
    for j, spec in enumerate(specs):
        if not spec.ranked:
            continue
        left, right = by_seed(a, j), by_seed(b, j)
        sign = 1.0 if spec.higher_is_better else -1.0
        diffs += [sign * spec.scale * (left[s] - right[s]) for s in sorted(left.keys() & right.keys())]
    return Paired(tuple(diffs))


def comparison_cells(result: Paired) -> list[str]:
    """[pairs, W / T / L, mean diff ± std, sign-test p, sign-flip p] as table text."""
    n = len(result.diffs)
    if n == 0:
        return ["0", EMPTY, EMPTY, EMPTY, EMPTY]
    spread = f" ± {statistics.stdev(result.diffs):.2f}" if n > 1 else ""
    return [
        str(n),
        f"{result.wins} / {result.ties} / {result.losses}",
        f"{statistics.fmean(result.diffs):+.2f}{spread}",
        f"{sign_test_p(result.wins, result.losses):.3g}",
        f"{sign_flip_p(result.diffs):.3g}",
    ]


COLUMNS = ["pairs", "wins / ties / losses", "mean diff (A - B)", "sign test p", "sign-flip p"]
NOTE = (
    "Pairs: (benchmark, seed) cells both rows have; a positive difference means A is better (direction of "
    "each metric), in display units (percentage points for fractions). Two-sided p-values: exact sign test "
    "(ties dropped) and sign-flip permutation test of the mean difference."
)


def challenger_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """(A, B) row pairs to compare: every challenger row against every row of another method."""
    method = {label: label.split(" ")[0] for label in labels}
    return [(a, b) for a in labels if method[a] in CHALLENGERS for b in labels if method[b] != method[a]]
