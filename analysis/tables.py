"""The paper's tables from the results store, in Markdown and LaTeX (`astra-tables` / `make tables`).

One function per table: `glue_table` (per-task metric and average), `math_code_table` (GSM8K, MATH,
HumanEval, MBPP, average), `commonsense_table` (eight tasks, average), the ablations
(`ablation_select_table`, `ablation_rank_table`, `ablation_calib_table`), `sweep_table` (every metric
of a sweep, init time and trainable parameters) and `rank_table` (effective rank by module type).

Cells are `mean ± std` over seeds (sample std, ddof = 1; a single run prints its value alone) in the
format of the metric's declared kind (`analysis.formats`: fractions in percent, counts as integers,
rates and seconds with their unit, an arrow for the direction in the header); the last column counts
the row's seeds and a cell over fewer runs says `(n=k)`. A cell without a successful run prints `-`,
never a made-up number; an average is printed only over the seeds that have every task of the row.
The best mean of a column with a declared direction is bold when at least two rows have a value.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analysis import compare
from analysis.formats import EMPTY, MetricSpec, best_rows, common_spec
from analysis.store import (
    Stat,
    ablation_axes,
    get,
    group_runs,
    method_of,
    mixed_keys,
    ordered,
    runs_by_view,
)
from astra.erank import MODULE_ORDER, by_module_type
from astra.results import RunResult, scan_runs


@dataclass(frozen=True)
class Column:
    """A benchmark column: `aliases` name it in `task.name` (last path part) or in the metric key
    (`gsm8k/accuracy`, `gen/ARC-Easy/accuracy`); `metrics` are the metric names tried in order,
    () = the run's `task.main_metric`."""

    label: str
    aliases: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    prefix: str = ""  # protocol prefix of the metric key: `gen/boolq/accuracy`, `loglik/boolq/acc`


ACC = ("accuracy", "acc", "exact_match")
PASS1 = ("pass@1", "pass_at_1")
GLUE_COLUMNS = tuple(
    Column(label, (alias,))
    for label, alias in (("MNLI", "mnli"), ("SST-2", "sst2"), ("CoLA", "cola"), ("QQP", "qqp"),
                         ("QNLI", "qnli"), ("RTE", "rte"), ("MRPC", "mrpc"), ("STS-B", "stsb"))
)  # fmt: skip
MATH_CODE_COLUMNS = (
    Column("GSM8K", ("gsm8k",), ACC),
    Column("MATH", ("math", "math500"), ACC),
    Column("HumanEval", ("humaneval",), PASS1),
    Column("MBPP", ("mbpp",), PASS1),
)
COMMONSENSE_TASKS = (
    ("BoolQ", ("boolq",)), ("PIQA", ("piqa",)), ("SIQA", ("social_i_qa", "siqa")), ("HellaSwag", ("hellaswag",)),
    ("WinoGrande", ("winogrande",)), ("ARC-e", ("ARC-Easy", "arc_easy")), ("ARC-c", ("ARC-Challenge", "arc_challenge")),
    ("OBQA", ("openbookqa", "obqa")),
)  # fmt: skip
# LLM-Adapters protocol (generate, extract the answer): the paper's; log-likelihood ranking as lm-eval does it
COMMONSENSE_COLUMNS = tuple(Column(label, aliases, ACC, "gen") for label, aliases in COMMONSENSE_TASKS)
COMMONSENSE_LOGLIK_COLUMNS = tuple(
    Column(label, aliases, ("acc",), "loglik") for label, aliases in COMMONSENSE_TASKS
)
FAMILIES = {"glue": GLUE_COLUMNS, "math_code": MATH_CODE_COLUMNS, "commonsense": COMMONSENSE_COLUMNS,
            "commonsense_loglik": COMMONSENSE_LOGLIK_COLUMNS}  # fmt: skip


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9@]", "", text.lower())


def column_entry(run: RunResult, column: Column) -> tuple[str, float] | None:
    """(stored metric key, value) of the run for `column`, or None when the run did not evaluate it."""
    metrics = {_norm(k): k for k in run.eval_info.metrics}
    names = column.metrics or (str(get(run, "task.main_metric", "accuracy")),)
    prefix = _norm(column.prefix)
    candidates = [prefix + _norm(alias) + _norm(name) for alias in column.aliases for name in names]
    task = _norm(str(get(run, "task.name", "")).split("/")[-1])
    if task in {_norm(a) for a in column.aliases}:  # a single-task run names its metric without the task
        candidates += [prefix + _norm(name) for name in names]
    for key in candidates:
        if key in metrics:
            return metrics[key], float(run.eval_info.metrics[metrics[key]])
    return None


def column_value(run: RunResult, column: Column) -> float | None:
    entry = column_entry(run, column)
    return entry[1] if entry else None


def column_spec(runs: Sequence[RunResult], column: Column) -> MetricSpec:
    """The kind and direction the runs declare for the metric behind `column`."""
    return common_spec((r, e[0]) for r in runs if (e := column_entry(r, column)) is not None)


def seeds_of(runs: Sequence[RunResult]) -> int:
    """Number of distinct seeds among `runs` (0 for none)."""
    return len({repr(get(r, "seed")) for r in runs})


@dataclass
class Table:
    """A formatted table: `cells[i][j]` is the text of row i, column j; `bold` marks best cells."""

    name: str  # file stem
    title: str
    columns: list[str]
    rows: list[str]
    cells: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    note: str = ""
    row_header: str = "Method"

    def has_values(self) -> bool:
        """Whether any cell other than the seed counts holds a value (a table of `-` is not written)."""
        keep = [j for j, c in enumerate(self.columns) if c != SEEDS]
        return any(row[j] != EMPTY for row in self.cells for j in keep)

    def to_markdown(self) -> str:
        def text(i: int, j: int) -> str:
            cell = self.cells[i][j]
            return f"**{cell}**" if (i, j) in self.bold else cell

        lines = [f"| {self.row_header} | " + " | ".join(self.columns) + " |"]
        lines.append("|---|" + "---:|" * len(self.columns))
        for i, row in enumerate(self.rows):
            lines.append(f"| {row} | " + " | ".join(text(i, j) for j in range(len(self.columns))) + " |")
        head = f"**{self.title}**\n\n" if self.title else ""
        return head + "\n".join(lines) + (f"\n\n{self.note}" if self.note else "") + "\n"

    def to_latex(self) -> str:
        def text(i: int, j: int) -> str:
            cell = latex_cell(self.cells[i][j])
            return f"\\textbf{{{cell}}}" if (i, j) in self.bold else cell

        lines = [
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{{latex_escape(self.title)}}}",
            "\\begin{tabular}{l" + "r" * len(self.columns) + "}",
            "\\toprule",
            " & ".join([latex_escape(self.row_header), *map(latex_escape, self.columns)]) + " \\\\",
            "\\midrule",
        ]
        for i, row in enumerate(self.rows):
            lines.append(
                " & ".join([latex_escape(row), *(text(i, j) for j in range(len(self.columns)))]) + " \\\\"
            )
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in [self.row_header, *self.columns])
        body = []
        for i, row in enumerate(self.rows):
            cells = "".join(
                f"<td><b>{c}</b></td>" if (i, j) in self.bold else f"<td>{c}</td>"
                for j, c in enumerate(self.cells[i])
            )
            body.append(f"<tr><th>{row}</th>{cells}</tr>")
        note = f"<p class='note'>{self.note}</p>" if self.note else ""
        return f"<h3>{self.title}</h3><table><tr>{head}</tr>{''.join(body)}</table>{note}"


LATEX_SYMBOLS = {"±": "$\\pm$", "↑": "$\\uparrow$", "↓": "$\\downarrow$", "×": "$\\times$"}


def latex_escape(text: str) -> str:
    text = re.sub(r"([_%&#$])", r"\\\1", text)
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def latex_cell(cell: str) -> str:
    """`81.00 ± 1.41 (n=2)` -> `81.00$_{\\pm 1.41}$ (n=2)`: the std as a subscript, as papers print it."""
    match = re.fullmatch(r"(\S+) ± (\S+)(.*)", cell)
    return f"{match[1]}$_{{\\pm {match[2]}}}${match[3]}" if match else latex_escape(cell)


def mix_note(groups: dict[str, list[RunResult]]) -> str:
    """A warning naming rows that pool runs made with different settings (empty when none do)."""
    mixed = {label: mixed_keys(members) for label, members in groups.items()}
    parts = [f"{label} ({', '.join(keys)})" for label, keys in mixed.items() if keys]
    return f" WARNING: rows pooling runs with different settings: {'; '.join(parts)}." if parts else ""


SEEDS = "seeds"  # the trailing column counting each row's seeds
NOTE = ("Mean ± std over seeds (sample std); `(n=k)`: a cell over k runs, fewer than the row's seeds; "
        "`-`: no successful run.")  # fmt: skip


def _bold(stats: list[list[Stat]], specs: Sequence[MetricSpec]) -> set[tuple[int, int]]:
    """(row, column) of the best mean of each column by its declared direction."""
    bold = set()
    for j, spec in enumerate(specs):
        means = [(i, row[j].mean) for i, row in enumerate(stats) if row[j].n]
        bold |= {(i, j) for i in best_rows(means, spec)}
    return bold


def average_stat(members: Sequence[RunResult], columns: Sequence[Column]) -> Stat:
    """Mean over columns per seed, then mean ± std over the seeds that have every column."""
    by_seed: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in members:
        for j, column in enumerate(columns):
            if (value := column_value(run, column)) is not None:
                by_seed[repr(get(run, "seed"))][j].append(value)
    complete = [cols for cols in by_seed.values() if len(cols) == len(columns)]
    return Stat.of(sum(sum(v) / len(v) for v in cols.values()) / len(columns) for cols in complete)


def average_spec(specs: Sequence[MetricSpec]) -> MetricSpec | None:
    """The Avg column's format: when every declared column is a fraction or score of one direction
    (columns no run evaluated declare nothing and do not count); None when no average makes sense."""
    declared = [s for s in specs if s.kind]
    if len(specs) < 2 or not declared or len({s.higher_is_better for s in declared}) != 1:
        return None
    if not all(s.kind in ("fraction", "score") for s in declared):
        return None
    kind = "fraction" if all(s.kind == "fraction" for s in declared) else "score"
    return MetricSpec(kind, declared[0].higher_is_better)


def benchmark_table(
    runs: Sequence[RunResult], columns: Sequence[Column], name: str, title: str, average: bool = True,
    groups: dict[str, list[RunResult]] | None = None, row_header: str = "Method",
) -> Table:  # fmt: skip
    """Rows = groups of runs (method + ablation values), columns = benchmarks (+ Avg) and seeds."""
    groups = group_runs(runs) if groups is None else groups
    specs = [column_spec(runs, c) for c in columns]
    stats = [[Stat.of(column_value(r, c) for r in members) for c in columns] for members in groups.values()]
    labels = [spec.header(c.label) for spec, c in zip(specs, columns, strict=True)]
    avg_spec = average_spec(specs) if average else None
    if avg_spec is not None:
        labels.append(avg_spec.header("Avg"))
        specs.append(avg_spec)
        for row, members in zip(stats, groups.values(), strict=True):
            row.append(average_stat(members, columns))
    seeds = [seeds_of(members) for members in groups.values()]
    cells = [[spec.cell(s, n) for spec, s in zip(specs, row, strict=True)] + [str(n)]
             for row, n in zip(stats, seeds, strict=True)]  # fmt: skip
    note = NOTE + mix_note(groups)
    return Table(name, title, [*labels, SEEDS], list(groups), cells, _bold(stats, specs), note, row_header)


def comparison_table(runs: Sequence[RunResult], family: str) -> Table | None:
    """Paired "A vs B" tests over the (benchmark, seed) cells of a paper table's columns, for every
    challenger row (`analysis.compare.CHALLENGERS`) against every other method's row; None without pairs."""
    columns = FAMILIES[family]
    groups = group_runs(runs)
    specs = [column_spec(runs, c) for c in columns]
    values = [lambda run, c=c: column_value(run, c) for c in columns]
    pairs = compare.challenger_pairs(list(groups))
    if not pairs:
        return None
    rows = [f"{a} vs {b}" for a, b in pairs]
    cells = [compare.comparison_cells(compare.paired(groups[a], groups[b], values, specs)) for a, b in pairs]
    title = f"Paired comparisons over the {family} table's cells"
    return Table(f"{family}_paired", title, compare.COLUMNS, rows, cells, set(), compare.NOTE, "A vs B")


def glue_table(runs: Sequence[RunResult]) -> Table:
    """Paper Table (GLUE): MNLI/SST-2/QQP/QNLI/RTE/MRPC accuracy, CoLA Matthews, STS-B Pearson, average."""
    return benchmark_table(runs, GLUE_COLUMNS, "glue", "GLUE dev (each task's main metric)")


def commonsense_loglik_table(runs: Sequence[RunResult]) -> Table:
    """Commonsense by log-likelihood ranking of the answer options (lm-eval protocol), eight tasks, average."""
    return benchmark_table(
        runs,
        COMMONSENSE_LOGLIK_COLUMNS,
        "commonsense_loglik",
        "Commonsense reasoning, log-likelihood (accuracy)",
    )


def math_code_table(runs: Sequence[RunResult]) -> Table:
    """Paper Table (math and code): GSM8K and MATH accuracy, HumanEval and MBPP pass@1, average."""
    return benchmark_table(runs, MATH_CODE_COLUMNS, "math_code", "Math and code (accuracy, pass@1)")


def commonsense_table(runs: Sequence[RunResult]) -> Table:
    """Paper Table (commonsense reasoning): accuracy on eight tasks and their average."""
    return benchmark_table(
        runs, COMMONSENSE_COLUMNS, "commonsense", "Commonsense reasoning, generation (accuracy)"
    )


def populated(runs: Sequence[RunResult], columns: Sequence[Column]) -> bool:
    return any(column_value(r, c) is not None for r in runs for c in columns)


def populated_columns(runs: Sequence[RunResult]) -> list[Column]:
    """The paper columns that at least one run has a value for, then one column (its main metric) per
    task no paper column covers: an ablation on a task outside the paper's tables is never left out."""
    columns = [
        c for cols in FAMILIES.values() for c in cols if any(column_value(r, c) is not None for r in runs)
    ]
    covered = {str(get(r, "task.name")) for r in runs if any(column_value(r, c) is not None for c in columns)}
    others = sorted({str(get(r, "task.name")) for r in runs} - covered)
    return columns + [Column(task, (task.split("/")[-1],)) for task in others]


def ablation_table(runs: Sequence[RunResult], prefix: str, name: str, title: str) -> Table | None:
    """Rows = values of the ablated config fields under `prefix` (per method), columns = evaluated benchmarks.

    None when no field under `prefix` varies within a method in `runs`.
    """
    axes = [a for a in ablation_axes(runs) if a == prefix or a.startswith(f"{prefix}.")]
    if not axes:
        return None
    return benchmark_table(runs, populated_columns(runs), name, title, groups=group_runs(runs, axes))


def ablation_select_table(runs: Sequence[RunResult]) -> Table | None:
    """Ablation: which eigenvectors initialise B (tail | head | middle | random)."""
    return ablation_table(runs, "method.select", "ablation_select", "Ablation: eigenvector selection")


def ablation_rank_table(runs: Sequence[RunResult]) -> Table | None:
    """Ablation: adapter rank r."""
    return ablation_table(runs, "method.rank", "ablation_rank", "Ablation: rank")


def ablation_calib_table(runs: Sequence[RunResult]) -> Table | None:
    """Ablation: calibration data (number of samples, source, format, sequence length)."""
    return ablation_table(runs, "calib", "ablation_calib", "Ablation: calibration data")


# Column order of the overview: quality metrics, then speeds and times, then counts, then undeclared.
KIND_ORDER = ("fraction", "score", "loss", "rate", "seconds", "count", "")


def _metric_columns(runs: Sequence[RunResult]) -> list[tuple[str, str, MetricSpec]]:
    """(task, metric, spec) of every metric evaluated in `runs`, quality metrics first."""
    keys = {(str(get(r, "task.name")), k) for r in runs for k in r.eval_info.metrics}
    specs = {
        key: common_spec((r, key[1]) for r in runs if str(get(r, "task.name")) == key[0]) for key in keys
    }
    order = sorted(keys, key=lambda key: (KIND_ORDER.index(specs[key].kind), key))
    return [(task, metric, specs[(task, metric)]) for task, metric in order]


def _params(stat: Stat, total: Stat) -> str:
    if stat.n == 0:
        return EMPTY
    share = f" ({100 * stat.mean / total.mean:.2f}%)" if total.n and total.mean else ""
    return f"{stat.mean:,.0f}{share}"


INIT_SECONDS = MetricSpec("seconds")  # no direction: init cost is reported, not ranked


def sweep_table(runs: Sequence[RunResult], expected: Sequence[str] = (), name: str = "overview") -> Table:
    """Every metric of a sweep per group (each in its kind's format), init time, trainable parameters.

    `expected`: group labels that must appear as rows even without a successful run (all `-`).
    """
    groups = group_runs(runs)
    for label in expected:
        groups.setdefault(label, [])
    groups = {label: groups[label] for label in ordered(groups)}
    keys = _metric_columns(runs)
    tasks = {task for task, _, _ in keys}
    labels = [spec.header(metric if len(tasks) == 1 else f"{task} {metric}") for task, metric, spec in keys]
    stats, cells = [], []
    for members in groups.values():
        row = [Stat.of(r.eval_info.metrics.get(m) for r in members if str(get(r, "task.name")) == t)
               for t, m, _ in keys]  # fmt: skip
        stats.append(row)
        init = Stat.of(r.train_info.init_seconds for r in members)
        params = Stat.of(r.train_info.trainable_params for r in members)
        total = Stat.of(r.train_info.total_params for r in members)
        n = seeds_of(members)
        cells.append([spec.cell(s, n) for (_, _, spec), s in zip(keys, row, strict=True)]
                     + [INIT_SECONDS.cell(init), _params(params, total), str(n)])  # fmt: skip
    note = NOTE + " init: seconds to build the adapters (statistics included)." + mix_note(groups)
    columns = [*labels, INIT_SECONDS.header("init"), "trainable params", SEEDS]
    bold = _bold(stats, [spec for _, _, spec in keys])
    return Table(name, "Results", columns, list(groups), cells, bold, note)


ERANK = MetricSpec("dimensions")
RANK_TITLES = {"update": "Effective rank of dW = W_T - W_0", "adapter": "Effective rank of the adapter s·BA",
               "output_cov": "Effective rank of the output-activation covariance"}  # fmt: skip


def rank_table(runs: Sequence[RunResult], quantity: str = "update") -> Table | None:
    """Roy-Vetterli effective rank at the last probed step, by module type (mean over layers, mean ± std
    over seeds)."""
    probed = [r for r in runs if r.train_info.rank_probes]
    if not probed:
        return None
    groups = group_runs(probed)
    finals = {label: [by_module_type(r.train_info.rank_probes[-1].get(quantity) or {}) for r in rs]
              for label, rs in groups.items()}  # fmt: skip
    kinds = [k for k in (*MODULE_ORDER, "other") if any(k in f for fs in finals.values() for f in fs)]
    if not kinds:
        return None
    finals = {label: fs for label, fs in finals.items() if any(fs)}  # full FT has no adapter rows
    stats = [[Stat.of(f.get(k) for f in fs) for k in kinds] for fs in finals.values()]
    seeds = [seeds_of(groups[label]) for label in finals]
    cells = [[ERANK.cell(s, n) for s in row] + [str(n)] for row, n in zip(stats, seeds, strict=True)]
    tasks = {get(r, "task.name") for r in probed}
    over = "runs (seeds and tasks)" if len(tasks) > 1 else "seeds"
    note = f"At the last probed step; mean over the layers of each type, mean ± std over {over}."
    return Table(f"rank_{quantity}", RANK_TITLES[quantity], [*kinds, SEEDS], list(finals), cells, set(), note)


PAPER_TABLES: tuple[Callable[[Sequence[RunResult]], Table | None], ...] = (
    glue_table, math_code_table, commonsense_table, commonsense_loglik_table,
    ablation_select_table, ablation_rank_table, ablation_calib_table,
)  # fmt: skip


def tables_for(runs: Sequence[RunResult]) -> list[Table]:
    """Every table that has at least one value for these runs: overview, paper tables, ablations, ranks."""
    candidates = [sweep_table(runs), *(f(runs) for f in PAPER_TABLES)]
    candidates += [comparison_table(runs, family) for family in FAMILIES if populated(runs, FAMILIES[family])]
    candidates += [rank_table(runs, q) for q in RANK_TITLES]
    return [t for t in candidates if t is not None and t.has_values()]


def by_model(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    models: dict[str, list[RunResult]] = {}
    for run in runs:
        models.setdefault(str(get(run, "model.name", "?")), []).append(run)
    return dict(sorted(models.items()))


def sweep_tables(runs: Sequence[RunResult], sweep: str) -> list[Table]:
    """Tables of one sweep, one set per model; file stems `<sweep>[__<model>]__<table>`."""
    models = by_model(runs)
    out = []
    for model, model_runs in models.items():
        stem = f"{sweep}__{model}" if len(models) > 1 else sweep
        for table in tables_for(model_runs):
            table.name = f"{stem}__{table.name}"
            table.title = f"{sweep} / {model}: {table.title}"
            out.append(table)
    return out


def write_table(table: Table, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{table.name}.md", out_dir / f"{table.name}.tex"]
    paths[0].write_text(table.to_markdown())
    paths[1].write_text(table.to_latex())
    return paths


def regenerate(results_dir: Path, out_dir: Path, smooth: float = 0.0) -> list[Path]:
    """Every table (Markdown, LaTeX) and figure (PNG) of every sweep view in the store; returns the files.

    Colours are assigned over every method in the store, so a method keeps its colour across sweeps.
    """
    from analysis.curves import sweep_figures

    views = runs_by_view(results_dir)
    methods = {method_of(r) for runs in views.values() for r in runs}
    written: list[Path] = []
    index = []
    for sweep, sweep_runs in views.items():
        for table in sweep_tables(sweep_runs, sweep):
            written += write_table(table, out_dir / "tables")
            index.append(table.to_markdown())
        written += sweep_figures(sweep_runs, sweep, out_dir / "figures", smooth=smooth, methods=methods)
    if index:
        (out_dir / "tables").mkdir(parents=True, exist_ok=True)
        (out_dir / "tables" / "index.md").write_text("\n".join(index))
        written.append(out_dir / "tables" / "index.md")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate every table and figure from the results store.")
    parser.add_argument("--results-dir", default=os.environ.get("ASTRA_RESULTS_DIR", "results"))
    parser.add_argument(
        "--out", default=None, help="writes <out>/tables and <out>/figures (default: results dir)"
    )
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for the curves")
    parser.add_argument("--allow-bad", action="store_true", help="unreadable result files: warn, exit 0")
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    if not results_dir.exists():
        sys.exit(f"no results store at {results_dir.resolve()} (set --results-dir or ASTRA_RESULTS_DIR)")
    _, bad = scan_runs(results_dir)  # files the tables leave out: named here, and the exit code says so
    if bad:
        print(f"{len(bad)} result file(s) could not be read or verified:", *bad, sep="\n  ", file=sys.stderr)
    written = regenerate(results_dir, Path(args.out or results_dir), smooth=args.smooth)
    if not written:
        sys.exit(f"no results under {results_dir.resolve()}: run a sweep first (e.g. `make demo`)")
    for path in written:
        print(path)
    if bad and not args.allow_bad:
        sys.exit(1)  # tables silently missing runs must not look like a clean regeneration (--allow-bad)


if __name__ == "__main__":
    main()
