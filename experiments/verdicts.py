"""docs/results.md and the README's results section, generated from the results store: what was run, on
what, how long; the CPU-scale tables; and a claim-by-claim verdict on the paper's claims.

    python -m experiments.verdicts [--results-dir results] [--out docs/results.md] [--readme README.md]

Reads the store only through `astra.results` / `analysis` (never the pipeline). Every number printed is a
mean over stored results; nothing is typed in by hand, and CPU-scale numbers are never the paper's.

Verdict rule (one rule for every claim, `verdict`): a claim "A is better than B on metric M" is judged on
the paired differences d_i = A_i - B_i (signed so that d > 0 means A better) over the (task, seed) cells
both have. With fewer than `MIN_PAIRS` pairs: **cannot be judged at this scale**. Otherwise **holds** when
the mean difference favours A and the two-sided paired t-test (one-sample t on d) gives p < `ALPHA`;
**does not hold** when the mean difference favours B with p < `ALPHA`; else **cannot be judged at this
scale** (no significant difference at this number of seeds). The exact sign-flip test (analysis.compare) is
reported next to it; with 3 pairs it cannot go below p = 0.25, which is why the t-test (normal seed noise
assumed) carries the decision.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scipy import stats as scipy_stats

from analysis.compare import sign_flip_p
from analysis.formats import spec_of
from analysis.store import Stat, get, method_of, method_order, runs_by_view
from astra.results import RunResult
from experiments import paper

ALPHA = 0.05
MIN_PAIRS = 3
HOLDS, FAILS, UNJUDGED = "holds", "does not hold", "cannot be judged at this scale"
MINI_SWEEPS = ("mini_glue", "mini_nlg", "mini_select", "mini_calib")
EARLY_FRACTION = 0.25  # convergence: mean training loss over the first quarter of the logged steps
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
SMOLLM_NOTE = (
    "SmolLM2-135M-Instruct's supervised fine-tuning mix reportedly contains MetaMathQA-derived data, so its "
    "GSM8K numbers after training on the (substitute) MetaMathQA task measure little new learning."
)
Value = Callable[[RunResult], float | None]  # a run's number for one claim (display units)


# --- per-run values -------------------------------------------------------------------------------------
def main_metric(run: RunResult) -> float | None:
    """The task's main metric in display units (percent for fractions)."""
    name = str(get(run, "task.main_metric", ""))
    value = run.eval_info.metrics.get(name)
    return None if value is None else value * spec_of(run, name).scale


def early_loss(run: RunResult) -> float | None:
    """Mean training loss over the first `EARLY_FRACTION` of the logged steps (lower = faster start)."""
    losses = [row["loss"] for row in run.train_info.history if "loss" in row]
    if not losses:
        return None
    return statistics.fmean(losses[: max(1, math.ceil(len(losses) * EARLY_FRACTION))])


def update_erank(run: RunResult) -> float | None:
    """Effective rank of dW = W_T - W_0 at the last probe, mean over layers."""
    probes = run.train_info.rank_probes
    ranks = list((probes[-1].get("update") or {}).values()) if probes else []
    return statistics.fmean(ranks) if ranks else None


def forgetting(run: RunResult) -> float | None:
    return run.eval_info.metrics.get("forgetting")


# --- claims ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    claim: str  # the paper's statement (or ours, marked)
    sweep: str
    a: dict[str, object]  # config fields selecting A's runs, e.g. {"method.name": "astra"}
    b: dict[str, object]
    metric: str  # what is compared, in words
    value: Value
    higher_is_better: bool

    def label(self, side: dict[str, object]) -> str:
        return ", ".join(f"{v}" if k == "method.name" else f"{k.split('.')[-1]}={v}" for k, v in side.items())


@dataclass
class Judged:
    claim: Claim
    diffs: list[float]  # positive = A better, display units
    verdict: str
    t_p: float | None
    flip_p: float | None
    ran: bool = True  # whether the claim's sweep has any run in the store


def select(runs: Sequence[RunResult], where: dict[str, object]) -> list[RunResult]:
    return [r for r in runs if r.ok and all(str(get(r, k)) == str(v) for k, v in where.items())]


def by_cell(runs: Sequence[RunResult], value: Value) -> dict[tuple[str, str], float]:
    """{(task, seed): mean value over the runs of that cell}."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        if (v := value(run)) is not None and math.isfinite(v):
            cells[(str(get(run, "task.name")), str(get(run, "seed")))].append(v)
    return {k: statistics.fmean(vs) for k, vs in cells.items()}


def paired_diffs(a: Sequence[RunResult], b: Sequence[RunResult], value: Value, higher: bool) -> list[float]:
    left, right = by_cell(a, value), by_cell(b, value)
    sign = 1.0 if higher else -1.0
    return [sign * (left[k] - right[k]) for k in sorted(left.keys() & right.keys())]


def t_test_p(diffs: Sequence[float]) -> float:
    """Two-sided one-sample t-test of mean(diffs) = 0; 1 when every difference is 0, 0 when all are equal
    and non-zero (no spread)."""
    if not any(diffs):
        return 1.0
    if statistics.pstdev(diffs) == 0:
        return 0.0
    return float(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)


def verdict(diffs: Sequence[float]) -> tuple[str, float | None]:
    """(verdict, t-test p) by the module's rule."""
    if len(diffs) < MIN_PAIRS:
        return UNJUDGED, None
    p, mean = t_test_p(diffs), statistics.fmean(diffs)
    if p < ALPHA and mean > 0:
        return HOLDS, p
    if p < ALPHA and mean < 0:
        return FAILS, p
    return UNJUDGED, p


def judge(claim: Claim, views: dict[str, list[RunResult]]) -> Judged:
    runs = views.get(claim.sweep, [])
    diffs = paired_diffs(select(runs, claim.a), select(runs, claim.b), claim.value, claim.higher_is_better)
    decision, p = verdict(diffs)
    return Judged(claim, diffs, decision, p, sign_flip_p(diffs) if diffs else None, bool(runs))


def claims() -> list[Claim]:
    """The paper's claims (and the forgetting comparison beyond it) as paired comparisons on the mini sweeps."""
    out = []
    for astra in ("astra", "astra_code"):
        a = {"method.name": astra}
        for other in ("lora", "pissa", "lora_ga", "full_ft"):
            out.append(Claim(f"{astra} beats {other}", "mini_glue", a, {"method.name": other},
                             "SST-2 dev accuracy (%)", main_metric, True))  # fmt: skip
        for other in ("lora", "pissa"):
            out.append(Claim(f"{astra} beats {other}", "mini_nlg", a, {"method.name": other},
                             "GSM8K accuracy (%)", main_metric, True))  # fmt: skip
        for sweep in ("mini_glue", "mini_nlg"):
            out.append(Claim(f"{astra} converges faster than lora", sweep, a, {"method.name": "lora"},
                             f"mean train loss, first {EARLY_FRACTION:.0%} of steps", early_loss, False))  # fmt: skip
        out.append(Claim(f"{astra}'s update has a higher effective rank than lora's", "mini_glue", a,
                         {"method.name": "lora"}, "erank(dW) at the last step, mean over layers", update_erank,
                         True))  # fmt: skip
        out.append(Claim(f"{astra} forgets less than lora (beyond the paper)", "mini_nlg", a,
                         {"method.name": "lora"}, "forgetting (held-out loss increase)", forgetting, False))  # fmt: skip
    for other in ("head", "middle", "random"):
        out.append(Claim(f"tail eigenvectors beat {other}", "mini_select",
                         {"method.name": "astra", "method.select": "tail"},
                         {"method.name": "astra", "method.select": other}, "SST-2 dev accuracy (%)", main_metric,
                         True))  # fmt: skip
    for n in (8, 256):
        out.append(Claim(f"astra is robust to calibration size (N=64 vs N={n})", "mini_calib",
                         {"method.name": "astra", "calib.n": 64}, {"method.name": "astra", "calib.n": n},
                         "SST-2 dev accuracy (%); robust = not significantly different", main_metric, True))  # fmt: skip
    return out


def verdict_text(j: Judged) -> str:
    """Robustness claims hold when NO significant difference is found over >= MIN_PAIRS pairs."""
    if not j.ran:
        return f"{UNJUDGED} (sweep not run)"
    if not j.claim.claim.startswith("astra is robust"):
        return j.verdict
    if len(j.diffs) < MIN_PAIRS:
        return UNJUDGED
    return FAILS if j.verdict != UNJUDGED else f"{HOLDS} (no significant difference)"


# --- markdown -------------------------------------------------------------------------------------------
def fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def diff_text(diffs: Sequence[float]) -> str:
    if not diffs:
        return "-"
    spread = f" ± {statistics.stdev(diffs):.3g}" if len(diffs) > 1 else ""
    return f"{statistics.fmean(diffs):+.3g}{spread}"


def verdict_table(judged: Sequence[Judged]) -> str:
    lines = ["| claim | sweep | A vs B | compared | pairs | mean diff (A better > 0) | t-test p | "
             "sign-flip p | verdict | command |", "|---|---|---|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for j in judged:
        c = j.claim
        lines.append(
            f"| {c.claim} | `{c.sweep}` | {c.label(c.a)} vs {c.label(c.b)} | {c.metric} | {len(j.diffs)} | "
            f"{diff_text(j.diffs)} | {fmt_p(j.t_p)} | {fmt_p(j.flip_p)} | **{verdict_text(j)}** | "
            f"`make sweep SWEEP={c.sweep}` |"
        )
    return "\n".join(lines) + "\n"


def run_seconds(run: RunResult) -> float:
    """Start to finish of a run (model load, init, training, evaluation), else its training time."""
    try:
        start = dt.datetime.fromisoformat(run.run_info.started_at)
        end = dt.datetime.fromisoformat(run.run_info.finished_at)
        return (end - start).total_seconds()
    except (TypeError, ValueError):
        return run.train_info.wall_seconds


def hms(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {sec:02d} s"


def values_of(runs: Sequence[RunResult], key: str) -> str:
    found = sorted({"all" if get(r, key) is None else str(get(r, key)) for r in runs}, key=lambda s: [int(t) if t.isdigit() else t
                                                                   for t in re.split(r"(\d+)", s)])  # fmt: skip
    return ", ".join(found) if found else "-"


def what_was_run(views: dict[str, list[RunResult]]) -> tuple[str, float]:
    """A table of the mini sweeps in the store and the total wall time (sum over runs)."""
    lines = ["| sweep | runs (ok / failed) | model | task | methods | seeds | train examples | eval examples | "
             "wall time (sum of runs) | device |", "|---|---:|---|---|---|---|---|---|---:|---|"]  # fmt: skip
    total = 0.0
    for sweep, runs in views.items():
        if not runs:
            continue
        seconds = sum(run_seconds(r) for r in runs)
        total += seconds
        ok = sum(r.ok for r in runs)
        devices = ", ".join(sorted({r.meta_info.device for r in runs}))
        lines.append(
            f"| `{sweep}` | {ok} / {len(runs) - ok} | {values_of(runs, 'model.name')} | "
            f"{values_of(runs, 'task.name')} | {', '.join(sorted({method_of(r) for r in runs}))} | "
            f"{values_of(runs, 'seed')} | {values_of(runs, 'task.train_limit')} | {values_of(runs, 'eval.limit')} "
            f"| {hms(seconds)} | {devices} |"
        )
    return "\n".join(lines) + "\n", total


def datasets_used(views: dict[str, list[RunResult]]) -> str:
    used = sorted(
        {r.meta_info.dataset_used for runs in views.values() for r in runs if r.meta_info.dataset_used}
    )
    return "\n".join(f"- {u}" for u in used) + "\n" if used else "- (none recorded)\n"


def forgetting_table(runs: Sequence[RunResult]) -> str:
    """Per method: forgetting, held-out loss before (base model) and after training, mean ± std over seeds."""
    keys = ("forgetting", "forgetting/loss_before", "forgetting/loss_after")
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        if run.ok and "forgetting" in run.eval_info.metrics:
            by_method[method_of(run)].append(run)
    if not by_method:
        return "No run with a forgetting measurement in the store.\n"
    lines = ["| method | forgetting ↓ | loss before | loss after | seeds |", "|---|---:|---:|---:|---:|"]
    for method in method_order(by_method):
        stats = [Stat.of(r.eval_info.metrics.get(k) for r in by_method[method]) for k in keys]
        cells = [f"{s.mean:.4f}" + (f" ± {s.std:.4f}" if s.n > 1 else "") for s in stats]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {stats[0].n} |")
    return "\n".join(lines) + "\n"


def tables_section(results_dir: str | Path) -> str:
    """Each paper item's CPU-scale table and paired tests (experiments.paper, mini scale)."""
    parts = []
    for item in paper.PAPER:
        if item.mini and any(paper.item_runs(results_dir, item, "mini")):
            text = paper.describe(results_dir, item, "mini").replace(
                "## ", "### CPU-scale counterpart of: ", 1
            )
            parts.append(text)
    return "\n\n".join(parts) + "\n" if parts else "No mini sweep has results in the store yet.\n"


RULE_TEXT = (
    f'Verdict rule: a claim "A is better than B" is judged on the paired differences over the (task, seed) '
    f"cells both have (positive = A better, in the metric's direction). Fewer than {MIN_PAIRS} pairs: "
    f"*{UNJUDGED}*. Otherwise *{HOLDS}* when the mean difference favours A and the two-sided paired t-test "
    f"gives p < {ALPHA}; *{FAILS}* when it favours B with p < {ALPHA}; else *{UNJUDGED}* (no significant "
    f"difference at this number of seeds). Robustness claims hold when no significant difference is found. "
    f"The exact sign-flip p is shown too: with 3 pairs it cannot fall below 0.25."
)


def render(results_dir: str | Path) -> tuple[str, str]:
    """(docs/results.md text, README section text)."""
    views = {s: runs for s, runs in runs_by_view(results_dir, MINI_SWEEPS).items() if runs}
    judged = [judge(c, views) for c in claims()]
    run_table, total = what_was_run(views)
    command = "python -m experiments.verdicts"
    doc = [
        "# Results (CPU scale)\n",
        f"Generated by `{command}` from the results store (`{results_dir}`); do not edit by hand. These are "
        "**CPU-scale** runs of small embedded models (all-MiniLM-L6-v2, SmolLM2-135M-Instruct) on subsampled "
        "tasks: they test the paper's claims at this scale only and are **not the paper's numbers** "
        "(the paper-scale sweeps are `conf/sweep/{glue_table1,nlg_math,nlg_code,commonsense,ablation_*}`).\n",
        "## What was run\n",
        run_table if views else "No mini sweep has results in the store yet: run them first (see README).\n",
        f"Total wall time: {hms(total)} (sum over runs, start to finish of each run).\n",
        "Training data actually used (offline substitutes are named):\n",
        datasets_used(views),
        f"Note: {SMOLLM_NOTE}\n",
        "## Verdicts\n",
        RULE_TEXT + "\n",
        verdict_table(judged),
        "## Forgetting (beyond the paper)\n",
        "As PEFT's MetaMathQA benchmark: mean next-token cross-entropy on held-out general text after training "
        "minus the base model's before any init (lower is better). Text: the first 128 distinct sentences of "
        "GLUE QNLI dev (Wikipedia, from SQuAD contexts; `astra/forgetting.py`), since no Wikipedia dump is "
        "available offline. PEFT's maintainers measured 0.230 for Astra vs 0.050 for LoRA on Llama-3.2-3B.\n",
        forgetting_table(views.get("mini_nlg", [])),
        "## Tables\n",
        "Mean ± std over seeds, `(n=k)` where a cell has fewer runs; `-` = no run; paired tests per "
        '"Astra vs X" (analysis/compare.py). Regenerate the files with '
        "`python -m experiments.paper --scale mini --table <id>`.\n",
        tables_section(results_dir),
    ]
    counts = {v: sum(verdict_text(j).startswith(v) for j in judged) for v in (HOLDS, FAILS, UNJUDGED)}
    readme = "\n".join([
        f"CPU-scale checks of the paper's claims (generated by `{command}`; details, numbers and commands in "
        f"[docs/results.md](docs/results.md); not the paper's numbers). {len(views)} mini sweep(s), "
        f"{sum(len(r) for r in views.values())} runs, {hms(total)} of compute: "
        + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".\n",
        verdict_table(judged),
        RULE_TEXT,
    ])  # fmt: skip
    return "\n".join(doc), readme


def replace_section(text: str, section: str) -> str:
    """`text` with everything between the README markers replaced by `section` (markers kept)."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"markers {README_START} ... {README_END} not found")
    return text[: start + len(README_START)] + "\n" + section.rstrip() + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=os.environ.get("ASTRA_RESULTS_DIR", "results"))
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--readme", default="README.md", help="file with the results markers ('' = none)")
    args = parser.parse_args(argv)
    doc, section = render(args.results_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(doc, encoding="utf-8")
    print(f"wrote {args.out}")
    if args.readme:
        readme = Path(args.readme)
        try:
            readme.write_text(replace_section(readme.read_text(encoding="utf-8"), section), encoding="utf-8")
            print(f"updated the results section of {readme}")
        except (OSError, ValueError) as err:
            print(f"README not updated: {err}")


if __name__ == "__main__":
    main()
