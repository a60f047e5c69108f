"""The paper's tables from the results store, in Markdown and LaTeX (`astra-tables` / `make tables`).

One function per table: `glue_table` (per-task metric and average), `math_code_table` (GSM8K, MATH,
HumanEval, MBPP, average), `commonsense_table` (eight tasks, average), the ablations
(`ablation_select_table`, `ablation_rank_table`, `ablation_calib_table`), `sweep_table` (every metric
of a sweep, init time and trainable parameters) and `rank_table` (effective rank by module type).

Cells are `mean ± std` over seeds (sample std, ddof = 1; a single seed prints its value alone);
task metrics are in percent. A cell without a successful run prints `-`, never a made-up number; an
average is printed only when every task of its row is present. The best mean of a metric column
is bold when at least two rows have a value.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analysis.effective_rank import MODULE_ORDER, by_module_type
from analysis.store import Stat, ablation_axes, get, group_runs, load_runs, mixed_keys, ordered, sweeps
from astra.results import RunResult

EMPTY = "-"


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


def column_value(run: RunResult, column: Column) -> float | None:
    """The run's value for `column`, or None when the run did not evaluate that benchmark."""
    metrics = {_norm(k): v for k, v in run.eval_info.metrics.items()}
    names = column.metrics or (str(get(run, "task.main_metric", "accuracy")),)
    for alias in column.aliases:
        for name in names:
            key = _norm(column.prefix) + _norm(alias) + _norm(name)
            if key in metrics:
                return float(metrics[key])
    task = _norm(str(get(run, "task.name", "")).split("/")[-1])
    if task in {_norm(a) for a in column.aliases}:
        for name in names:
            if _norm(column.prefix) + _norm(name) in metrics:
                return float(metrics[_norm(column.prefix) + _norm(name)])
    return None


def format_stat(stat: Stat, scale: float = 100.0, digits: int = 2) -> str:
    if stat.n == 0:
        return EMPTY
    mean = f"{stat.mean * scale:.{digits}f}"
    return mean if stat.n == 1 else f"{mean} ± {stat.std * scale:.{digits}f}"


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
        return any(c != EMPTY for row in self.cells for c in row)

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
            cell = self.cells[i][j].replace(" ± ", "$_{\\pm ") + ("}$" if " ± " in self.cells[i][j] else "")
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


def latex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text).replace("±", "$\\pm$")


def best_cells(stats: list[list[Stat]], columns: Sequence[int]) -> set[tuple[int, int]]:
    """(row, column) of the highest mean in each of `columns`, when at least two rows have a value."""
    bold = set()
    for j in columns:
        values = [(s[j].mean, i) for i, s in enumerate(stats) if s[j].n]
        if len(values) >= 2:
            top = max(v for v, _ in values)
            bold |= {(i, j) for v, i in values if v == top}  # ties: every best row
    return bold


def mix_note(groups: dict[str, list[RunResult]]) -> str:
    """A warning naming rows that pool runs made with different settings (empty when none do)."""
    mixed = {label: mixed_keys(members) for label, members in groups.items()}
    parts = [f"{label} ({', '.join(keys)})" for label, keys in mixed.items() if keys]
    return f" WARNING: rows pooling runs with different settings: {'; '.join(parts)}." if parts else ""


def benchmark_table(
    runs: Sequence[RunResult], columns: Sequence[Column], name: str, title: str, average: bool = True,
    groups: dict[str, list[RunResult]] | None = None, row_header: str = "Method",
) -> Table:  # fmt: skip
    """Rows = groups of runs (method + ablation values), columns = benchmarks (+ Avg), cells in percent."""
    groups = group_runs(runs) if groups is None else groups
    stats = [[Stat.of(column_value(r, c) for r in members) for c in columns] for members in groups.values()]
    cells = [[format_stat(s) for s in row] for row in stats]
    labels = [c.label for c in columns]
    if average and len(columns) > 1:
        labels.append("Avg")
        for row_stats, row_cells in zip(stats, cells, strict=True):
            complete = all(s.n for s in row_stats)
            avg = Stat(sum(s.mean for s in row_stats) / len(row_stats), math.nan, 1) if complete else Stat()
            row_stats.append(avg)
            row_cells.append(format_stat(avg))
    bold = best_cells(stats, range(len(labels)))
    note = "Mean ± std over seeds, in percent; `-`: no successful run." + mix_note(groups)
    return Table(name, title, labels, list(groups), cells, bold, note, row_header)


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


def populated_columns(runs: Sequence[RunResult]) -> list[Column]:
    """The benchmark columns of every family that at least one run has a value for."""
    return [
        c for cols in FAMILIES.values() for c in cols if any(column_value(r, c) is not None for r in runs)
    ]


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


def _metric_keys(runs: Sequence[RunResult]) -> list[tuple[str, str]]:
    """(task, metric) pairs evaluated in `runs`, counts and speeds left out."""
    keys = {
        (str(get(r, "task.name")), k) for r in runs for k in r.eval_info.metrics if not k.startswith("n_")
    }
    return sorted(keys)


def _params(stat: Stat, total: Stat) -> str:
    if stat.n == 0:
        return EMPTY
    share = f" ({100 * stat.mean / total.mean:.2f}%)" if total.n and total.mean else ""
    return f"{stat.mean:,.0f}{share}"


def sweep_table(runs: Sequence[RunResult], expected: Sequence[str] = (), name: str = "overview") -> Table:
    """Every metric of a sweep per group, plus init time (s) and trainable parameters.

    `expected`: group labels that must appear as rows even without a successful run (all `-`).
    """
    groups = group_runs(runs)
    for label in expected:
        groups.setdefault(label, [])
    groups = {label: groups[label] for label in ordered(groups)}
    keys = _metric_keys(runs)
    tasks = {task for task, _ in keys}
    labels = [metric if len(tasks) == 1 else f"{task} {metric}" for task, metric in keys]
    stats, cells = [], []
    for members in groups.values():
        row = [
            Stat.of(r.eval_info.metrics.get(m) for r in members if get(r, "task.name") == t) for t, m in keys
        ]
        stats.append(row)
        init = Stat.of(r.train_info.init_seconds for r in members)
        params = Stat.of(r.train_info.trainable_params for r in members)
        total = Stat.of(r.train_info.total_params for r in members)
        cells.append([format_stat(s) for s in row] + [format_stat(init, 1.0), _params(params, total)])
    note = "Metrics: mean ± std over seeds, in percent; init: seconds to build the adapters; `-`: no run."
    note += mix_note(groups)
    columns = [*labels, "init (s)", "trainable params"]
    return Table(name, "Results", columns, list(groups), cells, best_cells(stats, range(len(keys))), note)


def rank_table(runs: Sequence[RunResult], quantity: str = "update") -> Table | None:
    """Effective rank at the last probed step, by module type (mean over layers, mean ± std over seeds)."""
    titles = {"update": "Effective rank of dW = W_T - W_0", "adapter": "Effective rank of the adapter s·BA",
              "output_cov": "Effective rank of the output-activation covariance"}  # fmt: skip
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
    cells = [[format_stat(s, 1.0) for s in row] for row in stats]
    tasks = {get(r, "task.name") for r in probed}
    over = "runs (seeds and tasks)" if len(tasks) > 1 else "seeds"
    note = f"At the last probed step; mean over the layers of each type, mean ± std over {over}."
    return Table(f"rank_{quantity}", titles[quantity], kinds, list(finals), cells, set(), note)


PAPER_TABLES: tuple[Callable[[Sequence[RunResult]], Table | None], ...] = (
    glue_table, math_code_table, commonsense_table, commonsense_loglik_table,
    ablation_select_table, ablation_rank_table, ablation_calib_table,
)  # fmt: skip


def tables_for(runs: Sequence[RunResult]) -> list[Table]:
    """Every table that has at least one value for these runs: overview, paper tables, ablations, ranks."""
    candidates = [sweep_table(runs), *(f(runs) for f in PAPER_TABLES)]
    candidates += [rank_table(runs, q) for q in ("update", "adapter", "output_cov")]
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
    """Every table (Markdown, LaTeX) and figure (PNG) of every sweep in the store; returns the files."""
    from analysis.curves import sweep_figures

    runs = load_runs(results_dir)
    written: list[Path] = []
    index = []
    for sweep in sweeps(runs):
        sweep_runs = [r for r in runs if r.run_info.sweep == sweep]
        for table in sweep_tables(sweep_runs, sweep):
            written += write_table(table, out_dir / "tables")
            index.append(table.to_markdown())
        written += sweep_figures(sweep_runs, sweep, out_dir / "figures", smooth=smooth)
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
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir)
    if not results_dir.exists():
        sys.exit(f"no results store at {results_dir.resolve()} (set --results-dir or ASTRA_RESULTS_DIR)")
    written = regenerate(results_dir, Path(args.out or results_dir), smooth=args.smooth)
    if not written:
        sys.exit(f"no results under {results_dir.resolve()}: run a sweep first (e.g. `make demo`)")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
