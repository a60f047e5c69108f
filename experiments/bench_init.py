"""Astra's initialisation against a plain forward and the authors' reference procedure, on one set of
calibration tokens.

    python -m experiments.bench_init [--model smollm2-135m] [--n 64] [--seq-len 512] [--batch-size 1]
                                     [--rank 16] [--rounds 2] [--procedures ...] [--skip memory agreement]
                                     [--grad] [--out FILE]

Calibration tokens: CodeAlpaca examples (`ASTRA_DATA_DIR`/codealpaca) tokenised and packed into n
rows of exactly seq_len tokens (no padding), the same rows for every procedure. Procedures:

- `forward`: the plain calibration forward (the model, batches of --batch-size, no hooks); the default
  batch 1 is the reference's, so all three see the same batches and the memory compares procedures,
  not batch sizes (at batch 8 the plain forward's own activations are +839 MiB);
- `reference`: the release's procedure re-implemented from its arithmetic (LyoAI/Astra astra.py, see
  tests/test_astra_release.py): forward hooks on all targets at once, batch 1, per call `Y / |max Y|`,
  NaN/inf check, `Y^T Y` in fp32; then a full fp32 `eigh` of every layer's d_out x d_out matrix;
- `astra`, `astra_code`: our init for the two presets: `astra.stats.collect_statistics` (sequential
  engine, shared input moments) -> `astra.eigen.decompose` (fp32) -> r columns (tail / head) ->
  A = V^T W and W - s B A for every layer, one block at a time;
- `astra+disk`, `astra_code+disk`: the same with `stats_offload=disk` (the hidden states between blocks
  in an unlinked temporary file); their columns must be identical;
- `astra_code+fp64eig`, `astra_code+fp64` (not run unless named in --procedures): the release preset with
  `eig_dtype=fp64`, and with `accum_dtype=fp64 eig_dtype=fp64` (what its head angle needs, see
  docs/performance.md).

Times are wall-clock in this process, every procedure once per round (the order reversed every other
round); a ratio is taken between procedures of one round and its median over the rounds is shown, with
the range (identical forwards here differ by up to 20 %).
Peak extra RSS of each is measured in a fresh process (spawned) around the procedure only (model and
tokens loaded before). Subspace agreement: for each procedure but `+disk` (identical columns), the
largest principal angle of its r selected columns (head) to `eigh` of the fp64 directly accumulated
statistic with the same options (one pass per preset), or (tail) |tr(V^T C V) - sum of the r smallest
eigenvalues| / lambda_max; for head also how many layers are
within 1e-3 degrees and the smallest perturbation of the statistic that explains every layer's angle
(Davis-Kahan: ||E|| / lambda_max >= sin(angle) x relative eigengap); for `astra_code` the largest
principal angle to the reference's own V[:, -r:]. `--grad`: peak RSS of the LoRA-GA gradient statistics
(`collect_statistics(kind="grad")`) plus a rank-r and a rank-128 SVD per layer, fresh process.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from astra.astra_init import astra_factors
from astra.eigen import decompose, principal_angle_deg, select_columns
from astra.stats import StatOptions, collect_statistics

PRESETS = {
    "astra": (StatOptions(), "tail"),  # the paper's text
    "astra_code": (StatOptions(centered=False, sample_norm="max_abs", normalizer="forwards"), "head"),
}
# procedure = preset[+variant]; a variant changes where the hidden states wait or the arithmetic:
# (stats_offload, accum_dtype or None for the preset's, eig_dtype)
VARIANTS = {"": ("none", None, "fp32"), "disk": ("disk", None, "fp32"),
            "fp64eig": ("none", None, "fp64"), "fp64": ("none", "fp64", "fp64")}  # fmt: skip
DEFAULT_PROCEDURES = ["forward", "reference", "astra", "astra_code", "astra+disk", "astra_code+disk"]
PROCEDURES = DEFAULT_PROCEDURES + ["astra_code+fp64eig", "astra_code+fp64"]


def procedure_settings(procedure: str) -> tuple[StatOptions, str, str, str]:
    """(statistic options, select, stats_offload, eig_dtype) of an Astra procedure."""
    preset, _, variant = procedure.partition("+")
    options, select = PRESETS[preset]
    offload, accum, eig_dtype = VARIANTS[variant]
    return (replace(options, accum_dtype=accum) if accum else options), select, offload, eig_dtype


class PeakRSS:
    """Peak resident memory (bytes) while inside, sampled every millisecond by a thread."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.extra_mib = (self.peak - self.base) / 2**20
        self.peak_mib = self.peak / 2**20


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------


def load(model_name: str) -> tuple[nn.Module, Any]:
    """(model in fp32, eval mode; tokenizer) through the framework's model configs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from astra.models import model_config, resolve_model_dir

    cfg = model_config(model_name)
    cache_dir = os.environ.get("ASTRA_CACHE_DIR", str(Path.home() / ".cache" / "astra"))
    path = resolve_model_dir(cfg, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def calibration_rows(tokenizer: Any, n: int, seq_len: int) -> torch.Tensor:
    """(n, seq_len) token ids: CodeAlpaca examples in file order, packed back to back."""
    data_dir = Path(os.environ.get("ASTRA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    examples = json.loads((data_dir / "codealpaca" / "code_alpaca_2k.json").read_text())
    ids: list[int] = []
    for ex in examples:
        text = "\n".join(x for x in (ex.get("instruction"), ex.get("input"), ex.get("output")) if x)
        ids += tokenizer(text + "\n\n")["input_ids"]
        if len(ids) >= n * seq_len:
            break
    if len(ids) < n * seq_len:
        raise ValueError(f"not enough calibration text for {n} x {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def batches_of(rows: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": rows[i : i + size], "attention_mask": torch.ones_like(rows[i : i + size])}
        for i in range(0, rows.shape[0], size)
    ]


def targets_of(model: nn.Module, model_name: str) -> dict[str, nn.Linear]:
    from astra.models import model_config

    suffixes = tuple(model_config(model_name).target_modules)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)}


# --------------------------------------------------------------------------------------------
# procedures (each returns what the agreement check needs, or None)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_forward(model: nn.Module, batches: list) -> None:
    for batch in batches:
        model(**batch, use_cache=False)


@torch.no_grad()
def reference(model: nn.Module, targets: dict[str, nn.Linear], rows: torch.Tensor, rank: int) -> dict:
    """The release: hooks on every target, batch 1, max-normalised Y^T Y; full fp32 eigh; V[:, -r:]."""
    sums: dict[str, Any] = dict.fromkeys(targets, 0)
    count = dict.fromkeys(targets, 0)

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            y = output[0].detach().float()
            y = y / torch.max(y).abs()
            if torch.isnan(y).any() or torch.isinf(y).any():
                raise ValueError("Invalid value found in output, please check your output data.")
            sums[name] = sums[name] + y.t().matmul(y)
            count[name] += 1

        return hook

    handles = [t.register_forward_hook(make_hook(n)) for n, t in targets.items()]
    try:
        for i in range(rows.shape[0]):
            model(input_ids=rows[i : i + 1], attention_mask=torch.ones_like(rows[i : i + 1]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    heads = {}
    for name in targets:
        _, V = torch.linalg.eigh(sums.pop(name) / count[name])
        heads[name] = V[:, -rank:].clone()
        del V
    return heads


@torch.no_grad()
def astra_init(model: nn.Module, targets: dict, batches: list, procedure: str, rank: int) -> dict:
    """Our init: statistics block by block -> decompose -> r columns -> A = V^T W, W - s B A."""
    options, select, offload, eig_dtype = procedure_settings(procedure)
    columns, scaling = {}, 2.0
    stream = collect_statistics(model, targets, "output_cov", batches, options, offload=offload)
    for name, stats in stream:
        eig = decompose(stats, eig_dtype)
        _, B, _ = astra_factors(targets[name].weight, select_columns(eig, rank, select), scaling)
        columns[name] = B  # V in the weight's dtype, as the init writes it
        del stats, eig
    return columns


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def setup(args: argparse.Namespace) -> tuple[nn.Module, dict, torch.Tensor, list]:
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    rows = calibration_rows(tokenizer, args.n, args.seq_len)
    return model, targets_of(model, args.model), rows, batches_of(rows, args.batch_size)


def run_procedure(
    name: str, model: nn.Module, targets: dict, rows: torch.Tensor, batches: list, rank: int
) -> Any:
    if name == "forward":
        return plain_forward(model, batches)
    if name == "reference":
        return reference(model, targets, rows, rank)
    return astra_init(model, targets, batches, name, rank)


def memory_run(args: argparse.Namespace, name: str) -> tuple[float, float, float]:
    """(extra MiB, peak MiB, seconds) of one procedure in this (fresh) process."""
    model, targets, rows, batches = setup(args)
    plain_forward(model, [{"input_ids": rows[:1, :8]}])  # page the mmapped weights in before measuring
    with PeakRSS() as mem:
        start = time.perf_counter()
        run_procedure(name, model, targets, rows, batches, args.rank)
        seconds = time.perf_counter() - start
    return mem.extra_mib, mem.peak_mib, seconds


def grad_run(args: argparse.Namespace) -> dict[str, float]:
    """Peak RSS of LoRA-GA's statistics (gradients as values) and per-layer SVDs at r and 128."""
    model, targets, rows, batches = setup(args)
    plain_forward(model, [{"input_ids": rows[:1, :8]}])  # page the mmapped weights in before measuring
    for b in batches:
        b["labels"] = b["input_ids"].clone()
    out: dict[str, float] = {}
    with PeakRSS() as mem:
        start = time.perf_counter()
        grads = dict(collect_statistics(model, targets, "grad", batches, StatOptions(grad_micro_batch=1)))
        out["grad_seconds"] = time.perf_counter() - start
        for r in (args.rank, 128):
            for g in grads.values():
                k = min(2 * r, *g.matrix.shape)
                U, S, Vh = torch.linalg.svd(g.matrix.float(), full_matrices=False)
                _ = (U[:, :k], Vh[:k])
    out.update(grad_extra_mib=mem.extra_mib, grad_peak_mib=mem.peak_mib)
    return out


def fresh(fn: Callable, *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def agreement(
    model: nn.Module,
    targets: dict,
    batches: list,
    runs: dict[str, dict],
    preset: str,
    rank: int,
    reference: dict | None = None,
) -> dict[str, dict]:
    """For each procedure of one preset (name -> its columns), the worst layer: head angle (deg) or tail
    energy error / lambda_max vs eigh of the fp64 direct statistic (accumulated once for all of them), with
    that layer's relative eigengap at the selection boundary (fp32 cannot resolve gaps ~1e-7)."""
    options, select = PRESETS[preset]
    direct = StatOptions(**{**options.__dict__, "accum_dtype": "fp64", "accumulate": "direct"})
    worst = dict.fromkeys(runs, (-1.0, "", 0.0))
    within = dict.fromkeys(runs, 0)  # head: layers within 1e-3 degrees
    perturbation = dict.fromkeys(runs, 0.0)  # head: the least ||E|| / lambda_max explaining every angle
    ref_worst = 0.0  # the release's own fp32 procedure against the same fp64 statistic (same options)
    for name, stats in collect_statistics(model, targets, "output_cov", batches, direct, "forward"):
        values, vectors = torch.linalg.eigh(stats.matrix)
        lam_max = float(values[-1])
        if select == "head":
            gap = float(values[-rank] - values[-rank - 1]) / lam_max
            if reference is not None:
                ref_worst = max(ref_worst, principal_angle_deg(reference[name], vectors[:, -rank:]))
        else:
            gap = float(values[rank] - values[rank - 1]) / lam_max
        for procedure, columns in runs.items():
            V = columns[name].double()
            if select == "head":
                err = principal_angle_deg(V, vectors[:, -rank:])
                within[procedure] += err < 1e-3
                sin_gap = math.sin(math.radians(err)) * gap  # Davis-Kahan: ||E|| / lambda_max >= this
                perturbation[procedure] = max(perturbation[procedure], sin_gap)
            else:
                err = abs(float(torch.trace(V.T @ stats.matrix @ V)) - float(values[:rank].sum())) / lam_max
            worst[procedure] = max(worst[procedure], (err, name, gap))
    key = "head_angle_deg" if select == "head" else "tail_energy_rel"
    out = {}
    for procedure, (err, layer, gap) in worst.items():
        out[procedure] = {key: err, "worst_layer": layer, "its_relative_gap": gap}
        if select == "head":
            out[procedure].update(
                layers_within_1e_3_deg=f"{within[procedure]}/{len(targets)}",
                implied_error_rel=perturbation[procedure],
            )
            if reference is not None and procedure == preset:  # once, on the preset's own row
                out[procedure]["reference_head_angle_deg"] = ref_worst
    return out


def interleaved(names: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name): every name once per round, the order reversed every other round."""
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            yield round_, name


def timed_rounds(
    args: argparse.Namespace,
    model: nn.Module,
    targets: dict,
    rows: torch.Tensor,
    batches: list,
    names: list[str],
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of every procedure in `interleaved` rounds (this machine drifts by up to 20 % between
    identical runs, so a ratio is only taken between procedures of the same round)."""
    seconds: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for round_, name in interleaved(names, args.rounds):
        start = time.perf_counter()
        results[name] = run_procedure(name, model, targets, rows, batches, args.rank)
        seconds[name].append(time.perf_counter() - start)
        print(f"round {round_ + 1}: {name}: {seconds[name][-1]:.2f} s", flush=True)
    return seconds, results


def bench(args: argparse.Namespace) -> dict[str, Any]:
    model, targets, rows, batches = setup(args)
    names = ["forward", "reference"] + [p for p in args.procedures if p not in ("forward", "reference")]
    seconds, results = timed_rounds(args, model, targets, rows, batches, names)
    memory = {} if "memory" in args.skip else {name: fresh(memory_run, args, name) for name in names}
    for preset in PRESETS:  # where the hidden states wait between blocks changes nothing
        plain, offloaded = results.get(preset), results.get(f"{preset}+disk")
        if plain and offloaded and any(not torch.equal(offloaded[n], plain[n]) for n in targets):
            raise AssertionError(f"{preset}+disk selected other columns than {preset}")
    quality = {}
    for preset in PRESETS if "agreement" not in args.skip else ():
        runs = {p: results[p] for p in names if p.partition("+")[0] == preset and not p.endswith("+disk")}
        if runs:
            quality |= agreement(model, targets, batches, runs, preset, args.rank, results["reference"])
    if "astra_code" in results:
        vs_ref = {n: principal_angle_deg(results["astra_code"][n], results["reference"][n]) for n in targets}
        worst = max(vs_ref, key=vs_ref.get)
        quality.setdefault("astra_code", {}).update(
            vs_reference_angle_deg=vs_ref[worst], vs_reference_worst_layer=worst
        )
    out = {"seconds": seconds, "memory": memory, "quality": quality, "layers": len(targets)}
    if args.grad:
        out["grad"] = fresh(grad_run, args)
    return out


def ratio(numerators: list[float], denominators: list[float], digits: int = 2) -> str:
    """Median and range of the per-round ratios."""
    r = [a / b for a, b in zip(numerators, denominators, strict=True)]
    spread = f" [{min(r):.{digits}f}-{max(r):.{digits}f}]" if len(r) > 1 else ""
    return f"{statistics.median(r):.{digits}f}x{spread}"


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options left at their defaults included, flags only when set)."""
    parts = [f"python -m experiments.bench_init --model {args.model} --n {args.n} --seq-len {args.seq_len}",
             f"--batch-size {args.batch_size} --rank {args.rank} --rounds {args.rounds}"]  # fmt: skip
    if args.procedures != DEFAULT_PROCEDURES:
        parts.append("--procedures " + " ".join(args.procedures))
    if args.skip:
        parts.append("--skip " + " ".join(args.skip))
    if args.grad:
        parts.append("--grad")
    return " ".join(parts)


def markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    t, m = res["seconds"], res["memory"]
    lines = [
        f"Command: `{command(args)}`; {time.strftime('%Y-%m-%d')}, {platform.machine()}, {psutil.cpu_count()} "
        f"cores, torch {torch.__version__}, {args.threads} threads, {res['layers']} target layers. Ratios: median "
        f"over the {args.rounds} round(s) of the ratio within a round [min-max].",
        "",
        "| procedure | time (median) | / plain forward | reference / it | peak extra RSS (fresh process) | / reference |",
        "|---|---|---|---|---|---|",
    ]
    for name in t:
        memory = f"{m[name][0]:.0f} MiB | {m[name][0] / max(m['reference'][0], 1e-9):.2f}x" if m else "- | -"
        lines.append(
            f"| {name} | {statistics.median(t[name]):.2f} s | {ratio(t[name], t['forward'])} | "
            f"{ratio(t['reference'], t[name])} | {memory} |"
        )
    lines += ["", "| procedure | agreement |", "|---|---|"]
    for procedure, q in res["quality"].items():
        cells = [f"{k} = {v:.2e}" if isinstance(v, float) else f"{k} = {v}" for k, v in q.items()]
        lines.append(f"| {procedure} | " + ", ".join(cells) + " |")
    if "grad" in res:
        g = res["grad"]
        lines += ["", f"LoRA-GA gradient statistics (+ per-layer SVD at r={args.rank} and r=128): "
                  f"{g['grad_seconds']:.1f} s, peak RSS {g['grad_peak_mib']:.0f} MiB "
                  f"(+{g['grad_extra_mib']:.0f} MiB over the loaded model)."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1, help="calibration batch (the reference's: 1)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds (interleaved, order reversed)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--procedures", nargs="+", choices=PROCEDURES, default=DEFAULT_PROCEDURES, metavar="NAME",
                        help=f"what to time, of: {', '.join(PROCEDURES)} (default: all but the last two; forward and "
                        "reference always run: every ratio is to them); +fp64eig: eig_dtype=fp64, +fp64: "
                        "accum_dtype=fp64 and eig_dtype=fp64")  # fmt: skip
    parser.add_argument("--skip", nargs="+", default=[], choices=("memory", "agreement"),
                        help="leave out the fresh-process memory runs / the fp64 subspace agreement")  # fmt: skip
    parser.add_argument("--grad", action="store_true", help="also LoRA-GA gradient statistics' peak RSS")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    text = markdown(bench(args), args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
