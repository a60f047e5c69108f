"""Benchmarks of Astra's preprocessing, as ratios against a baseline run in the same process.

    python -m experiments.bench [--models minilm smollm2-135m] [--n 16] [--seq-len 128] [--out FILE]

For each model: (1) statistics collection block by block vs all layers at once (wall time and
peak extra resident memory, sampled every millisecond, each in a fresh process); (2) `eigh` in fp64 vs fp32 over every
target layer's covariance; (3) the whole Astra build vs a plain LoRA build. Machines here are
noisy, so only ratios measured in one process are meant to be compared across machines.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import multiprocessing
import platform
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil
import torch
from peft import LoraConfig

from astra.build import build_trainable, target_linears
from astra.data import build_task
from astra.eigen import decompose as eigendecompose
from astra.methods import get_method
from astra.models import load_model
from astra.pipeline import build_context, compose_config
from astra.stats import stat_options, stream_covariances


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a background thread (MiB)."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak extra MiB, result) of one call."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.mib, out


def setup(model_name: str, n: int, seq_len: int) -> tuple[Any, Any, Any]:
    task = "glue/mrpc" if model_name in ("minilm", "tiny-bert") else "metamath"
    cfg = compose_config([f"model={model_name}", f"task={task}", "method=astra", f"calib.n={n}",
                          f"calib.seq_len={seq_len}", "method.cache=false", "logger=none"])  # fmt: skip
    model, tokenizer, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir)
    task_obj = build_task(cfg.task, tokenizer, cfg.paths.data_dir)
    return cfg, model, build_context(cfg, task_obj, model_id)


def drain(model: Any, targets: dict, batches: list, options: Any, grouping: str) -> int:
    """Collect every covariance, dropping each once formed (as Astra does); returns the layer count."""
    count = 0
    for _, acc in stream_covariances(model, targets, batches, options, grouping):
        acc.covariance()
        count += 1
    return count


def statistics_run(model_name: str, n: int, seq_len: int, grouping: str) -> tuple[float, float]:
    """(seconds, peak extra MiB) of collecting every covariance with `grouping`, in a fresh process
    so that memory freed by an earlier measurement cannot hide this one's peak."""
    cfg, model, ctx = setup(model_name, n, seq_len)
    batches = list(ctx.calib_batches())
    targets = target_linears(model, LoraConfig(target_modules=list(cfg.model.target_modules)))
    seconds, mib, _ = timed(lambda: drain(model, targets, batches, stat_options(cfg.method), grouping))
    return seconds, mib


def in_fresh_process(fn: Callable, *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_model(model_name: str, n: int, seq_len: int) -> list[tuple[str, str, str, str]]:
    t_all, m_all = in_fresh_process(statistics_run, model_name, n, seq_len, "all")
    t_blk, m_blk = in_fresh_process(statistics_run, model_name, n, seq_len, "block")
    cfg, model, ctx = setup(model_name, n, seq_len)
    batches = list(ctx.calib_batches())
    targets = target_linears(model, LoraConfig(target_modules=list(cfg.model.target_modules)))
    options = stat_options(cfg.method, "output_cov")
    rows = []
    rows.append(
        ("statistics: block / all-at-once, time", f"{t_blk:.2f} s", f"{t_all:.2f} s", f"{t_blk / t_all:.2f}x")
    )
    rows.append(("statistics: block / all-at-once, peak extra RSS", f"{m_blk:.0f} MiB", f"{m_all:.0f} MiB",
                 f"{m_blk / max(m_all, 1e-9):.2f}x"))  # fmt: skip

    covs = [acc.covariance() for _, acc in stream_covariances(model, targets, batches[:4], options, "all")]
    t32, _, _ = timed(lambda: [eigendecompose(c, "fp32") for c in covs])
    t64, _, _ = timed(lambda: [eigendecompose(c, "fp64") for c in covs])
    rows.append(
        (f"eigh of {len(covs)} covariances: fp64 / fp32", f"{t64:.2f} s", f"{t32:.2f} s", f"{t64 / t32:.2f}x")
    )

    lora_ctx = dataclasses.replace(
        ctx, cfg=compose_config([f"model={model_name}", "method=lora", "logger=none"])
    )
    t_lora, _, _ = timed(lambda: build_trainable(copy.deepcopy(model), get_method("lora"), lora_ctx))
    t_astra, _, _ = timed(lambda: build_trainable(copy.deepcopy(model), get_method("astra"), ctx))
    rows.append(
        ("init: Astra build / LoRA build", f"{t_astra:.2f} s", f"{t_lora:.2f} s", f"{t_astra / t_lora:.0f}x")
    )
    return rows


def markdown(results: dict[str, list], args: argparse.Namespace) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `python -m experiments.bench --models {' '.join(args.models)} --n {args.n} "
        f"--seq-len {args.seq_len}` on {platform.machine()} with {psutil.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Each ratio compares two "
        "measurements taken in the same process; absolute times are this machine's.",
        "",
        "Reading the statistics rows: block-wise collection (`method.stats_grouping=block`, the default)",
        "re-runs the calibration forwards once per transformer block, each stopping after that block, so",
        "its time grows with depth; in exchange it holds only one block's covariances, which is what lets",
        "a 7B model's statistics fit (all-at-once would hold every layer's d_out x d_out matrix at once).",
        "Where memory allows, `method.stats_grouping=all` gives the same statistics in one pass (a test",
        "pins the equality).",
        "",
    ]
    for model_name, rows in results.items():
        lines += [f"## {model_name} (calibration: {args.n} samples x {args.seq_len} tokens)", "",
                  "| measurement | subject | baseline | ratio |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    parser.add_argument("--n", type=int, default=16, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    results = {name: bench_model(name, args.n, args.seq_len) for name in args.models}
    text = markdown(results, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
