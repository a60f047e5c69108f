"""`python -m analysis.report` (`make report`): one self-contained report per sweep view of the results store.

Writes `<out>/reports/<sweep>.html` (tables inline, figures embedded as base64 PNG: one file to mail or
archive) and `<out>/reports/<sweep>.md` (figures linked from `<out>/figures/`). Sections: state of the
runs of the sweep's view (`analysis.status`), setup (settings shared by all runs and the ablation axes), every table,
the loss / grad-norm and effective-rank figures, the function-preservation check at init, failed
runs and provenance (git SHAs, packages, devices, data files).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from analysis.curves import sweep_figures
from analysis.formats import EMPTY, MetricSpec
from analysis.status import STATES, sweep_status
from analysis.store import Stat, ablation_axes, flatten, get, group_runs, method_of, runs_by_view
from analysis.tables import Table, sweep_tables
from astra.results import RunResult, sweep_names

SETUP_KEYS = (
    "model.name", "task.name", "task.train_limit", "task.max_length", "method.rank", "method.alpha",
    "trainer.lr", "trainer.epochs", "trainer.max_steps", "trainer.batch_size", "trainer.scheduler",
    "trainer.warmup_ratio", "calib.n", "calib.seq_len", "eval.limit",
)  # fmt: skip
CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th:first-child{text-align:left}img{max-width:100%}.note{color:#555;font-size:90%}pre{background:#f6f6f6;"
    "padding:0.5em;overflow-x:auto}"
)


def status_section(sweep: str, results_dir: Path) -> list[str]:
    """Runs of the sweep's view by state, and the ones that are not present."""
    runs = sweep_status(results_dir, sweep)
    counts = Counter(r.state for r in runs)
    lines = [f"{len(runs)} runs in the view `{sweep}`: " + ", ".join(f"{counts[s]} {s}" for s in STATES)]
    lines += [
        f"- {r.state}: `{r.signature}` {r.describe()} {r.detail}".rstrip()
        for r in runs
        if r.state != "present"
    ]
    return lines


def setup_section(runs: Sequence[RunResult]) -> list[str]:
    """Settings every run shares (a fixed list of the ones readers look for) and the ablation axes."""
    flats = [flatten(r.run_info.config) for r in runs]
    lines = []
    for key in SETUP_KEYS:
        values = sorted({repr(f.get(key)) for f in flats})
        lines.append(f"- `{key}`: {', '.join(v.strip(chr(39)) for v in values)}")
    axes = ablation_axes(runs)
    lines.append(f"- ablation axes (vary within a method): {', '.join(f'`{a}`' for a in axes) or 'none'}")
    seeds = sorted({get(r, "seed") for r in runs})
    lines.append(f"- seeds: {', '.join(map(str, seeds))}")
    return lines


def init_table(runs: Sequence[RunResult]) -> Table:
    """Loss of the base model vs. the initialised model on the same batch: function preservation at step 0."""
    groups = group_runs(runs)
    loss = MetricSpec("loss")
    cells = []
    for members in groups.values():
        base = Stat.of(r.train_info.base_loss for r in members)
        step0 = Stat.of(r.train_info.step0_loss for r in members)
        gap = Stat.of(
            abs(r.train_info.step0_loss - r.train_info.base_loss)
            for r in members
            if r.train_info.step0_loss is not None and r.train_info.base_loss is not None
        )
        cells.append([loss.cell(base), loss.cell(step0), f"{gap.mean:.2e}" if gap.n else EMPTY])
    note = "Same fixed training batch; methods that preserve the function at init have a difference ~ 0 (float round-off)."
    columns = ["base loss", "step-0 loss", "abs. difference (mean)"]
    return Table("init", "Function preservation at init", columns, list(groups), cells, set(), note)


def failed_section(runs: Sequence[RunResult]) -> list[str]:
    failed = [r for r in runs if not r.ok]
    out = []
    for run in failed:
        lines = [x for x in run.run_info.error.strip().splitlines() if x.strip()]
        where = f"{get(run, 'method.name')} / {get(run, 'task.name')} / seed {get(run, 'seed')}"
        out.append(f"- `{run.run_info.signature}` ({where}): {lines[-1] if lines else 'no error recorded'}")
    return out or ["none"]


def provenance_section(runs: Sequence[RunResult]) -> list[str]:
    shas = Counter(
        f"{r.run_info.git_sha[:10] or '?'}{' (dirty)' if r.run_info.git_dirty else ''}" for r in runs
    )
    packages = Counter(", ".join(f"{k} {v}" for k, v in sorted(r.meta_info.packages.items())) for r in runs)
    devices = Counter(r.meta_info.device or "?" for r in runs)
    data = sorted({(p, h[:12]) for r in runs for p, h in r.meta_info.data_files.items()})
    used = sorted({r.meta_info.dataset_used for r in runs if r.meta_info.dataset_used})
    lines = [f"- git: {', '.join(f'{k} x{v}' for k, v in shas.items())}"]
    lines += [f"- packages: {k} (x{v})" for k, v in packages.items()]
    lines.append(f"- devices: {', '.join(f'{k} x{v}' for k, v in devices.items())}")
    lines += [f"- dataset: {u}" for u in used]
    lines += [f"- data file `{p}` sha256 {h}..." for p, h in data]
    unsigned = sorted({path for r in runs for path in r.run_info.unsigned})
    lines.append(f"- run signatures hash the resolved config minus: {', '.join(unsigned) or 'nothing'}")
    return lines


def _md_section(title: str, lines: Sequence[str]) -> str:
    return f"## {title}\n\n" + "\n".join(lines) + "\n"


def _html_section(title: str, lines: Sequence[str]) -> str:
    items = "".join(f"<li>{html.escape(x.removeprefix('- '))}</li>" for x in lines)
    return f"<h2>{html.escape(title)}</h2><ul>{items}</ul>"


def embed_png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<figure><img src='data:image/png;base64,{data}' alt='{path.name}'><figcaption>{path.name}</figcaption></figure>"


def write_report(
    runs: Sequence[RunResult], sweep: str, out_dir: Path, results_dir: Path, methods: Sequence[str] = ()
) -> tuple[Path, Path]:
    """`<out>/reports/<sweep>.md` and `.html` for one sweep's runs; figures go to `<out>/figures/`.

    `methods`: every method whose figure colour must stay fixed (default: those of `runs`).
    """
    ok = [r for r in runs if r.ok]
    tables = [*sweep_tables(ok, sweep), init_table(ok)] if ok else []
    figures = sweep_figures(ok, sweep, out_dir / "figures", methods=methods)
    description = next((get(r, "sweep.description") for r in runs if get(r, "sweep.description")), "")
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    header = (
        f"{description}\n\n".lstrip() + f"{len(runs)} result files ({len(ok)} successful); generated {stamp}."
    )
    sections = [
        ("Status", status_section(sweep, results_dir)),
        ("Setup", setup_section(runs)),
        ("Failed runs", failed_section(runs)),
        ("Provenance", provenance_section(runs)),
    ]
    reports = out_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    md = [
        f"# Sweep `{sweep}`\n\n{header}\n",
        _md_section(*sections[0]),
        _md_section(*sections[1]),
        "## Results\n",
    ]
    md += [t.to_markdown() for t in tables]
    md += ["## Figures\n"] + [f"![{p.name}](../figures/{p.name})\n" for p in figures]
    md += [_md_section(*s) for s in sections[2:]]
    md_path = reports / f"{sweep}.md"
    md_path.write_text("\n".join(md))
    body = [f"<h1>Sweep {html.escape(sweep)}</h1><p>{html.escape(header)}</p>"]
    body += [_html_section(*sections[0]), _html_section(*sections[1]), "<h2>Results</h2>"]
    body += [t.to_html() for t in tables] + ["<h2>Figures</h2>"] + [embed_png(p) for p in figures]
    body += [_html_section(*s) for s in sections[2:]]
    html_path = reports / f"{sweep}.html"
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(sweep)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    return md_path, html_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write one self-contained report per sweep view of the results store."
    )
    parser.add_argument("sweeps", nargs="*", help="sweep names (default: every sweep view in the store)")
    parser.add_argument("--results-dir", default=os.environ.get("ASTRA_RESULTS_DIR", "results"))
    parser.add_argument(
        "--out", default=None, help="writes <out>/reports and <out>/figures (default: results dir)"
    )
    args = parser.parse_args(argv)
    results_dir = Path(args.results_dir).resolve()
    names = sweep_names(results_dir)
    wanted = args.sweeps or names
    if not wanted:
        sys.exit(f"no sweep views under {results_dir}: run a sweep first (e.g. `make demo`)")
    unknown = [s for s in wanted if s not in names]
    if unknown:
        sys.exit(
            f"no view for sweep(s) {', '.join(unknown)}; views in the store: {', '.join(names) or 'none'}"
        )
    views = runs_by_view(results_dir)
    methods = sorted({method_of(r) for runs in views.values() for r in runs})
    out = Path(args.out or args.results_dir)
    for sweep in wanted:
        for path in write_report(views[sweep], sweep, out, results_dir, methods):
            print(path)


if __name__ == "__main__":
    main()
