"""Training and evaluation benchmarks of causal LMs, as ratios against a baseline in the same process.

    python -m experiments.bench_train [--model smollm2-135m] [--methods all] [--rank 16]
        [--batch 16] [--seq-len 512] [--steps 3] [--calib-n 64] [--decode-tokens 64]
        [--eval-limit 32] [--eval-max-new-tokens 256] [--skip train decode eval] [--out FILE]

(1) Training step: every registered method is built (through the one build path, at equal rank) and
warmed up, then each takes one full optimiser step (forward, backward, AdamW) per round on one fixed
(batch, seq-len) batch through the trainer's loss, the order reversed every other round (--steps
rounds); its ratio to plain LoRA's step of the same round, median and range over the rounds, and
the peak extra resident memory during its steps (every method's model stays loaded). Since step times
here vary by +-20 %, each method's step is also traced once (after warm-up): its FLOPs
(`FlopCounterMode`) and how many of its aten calls (op, input shapes) differ from LoRA's, i.e. whether
it does LoRA's work exactly. (2) Decoding: greedy tokens/s at batch 1
(`astra.evaluate.generation.generate`, the evaluation path) next to the linear-layer floor: the time of
every nn.Linear of the model (LM head included) on one token, measured in the same process. (3) GSM8K
evaluation throughput (samples/s) at the configured evaluation batch, through the task's own
`evaluate`. Machines here are shared and noisy: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from astra.build import build_trainable
from astra.common import return_freed_memory
from astra.data import build_task
from astra.evaluate.generation import greedy_tokens, merged_adapters
from astra.methods import get_method, registered_methods
from astra.models import load_model
from astra.pipeline import build_context, compose_config
from astra.prompts import metamath_eval_prompt
from astra.trainer import causal_lm_loss, causal_lm_parts, use_gradient_checkpointing
from experiments.bench_init import PeakRSS, interleaved, ratio


def build_method(args: argparse.Namespace, method: str) -> tuple[Any, Any, Any]:
    """(config, trainable model, task) of `method` at `args.rank`, built through the one build path."""
    overrides = [f"model={args.model}", f"task={args.task}", f"method={method}", f"calib.n={args.calib_n}",
                 f"calib.seq_len={args.calib_seq_len}", "logger=none", f"paths.cache_dir={args.cache_dir}"]  # fmt: skip
    if method != "full_ft":
        overrides.append(f"method.rank={args.rank}")
    cfg = compose_config(overrides)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=cfg.seed)
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir, seed=cfg.seed)
    ctx = build_context(cfg, task, model_id)
    return cfg, build_trainable(model, get_method(method), ctx)[0], task


def fixed_batch(batch: int, seq_len: int, vocab: int, prompt_frac: float = 0.25) -> dict[str, torch.Tensor]:
    """(batch, seq_len) random tokens; the first `prompt_frac` of every row is prompt (label -100)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : int(seq_len * prompt_frac)] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], lr: float) -> Callable[[], float]:
    """One optimiser step as the trainer takes it (its loss path, AdamW over the trainable parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    parts = causal_lm_parts(model)

    def step() -> float:
        loss = causal_lm_loss(parts, batch) if parts else model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


class OpTrace(TorchDispatchMode):
    """The aten calls of a region as a multiset of (op, input shapes): what a step computes, without noise."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        leaves = tree_leaves((args, kwargs or {}))
        self.calls[
            (str(func.overloadpacket), tuple(tuple(t.shape) for t in leaves if torch.is_tensor(t)))
        ] += 1
        return func(*args, **(kwargs or {}))


def trace_step(step: Callable[[], float]) -> tuple[Counter, int]:
    """(aten calls, FLOPs) of one optimiser step."""
    with FlopCounterMode(display=False) as flops, OpTrace() as ops:
        step()
    return ops.calls, flops.get_total_flops()


def calls_differing(calls: Counter, other: Counter) -> int:
    """Aten calls (op, shapes) made by one step and not the other, either way."""
    return sum(((calls - other) + (other - calls)).values())


def bench_training(args: argparse.Namespace, methods: list[str]) -> list[dict[str, Any]]:
    """Build every method, then time one step of each per round (the order reversed every other round):
    identical steps here differ by up to 20 % over minutes, so a ratio to LoRA is taken within a round."""
    steps, rows = {}, {}
    for method in methods:
        try:
            cfg, model, _ = build_method(args, method)
        except Exception as err:  # a method that cannot build at this size is reported, not fatal
            print(f"  {method:<11} build failed: {type(err).__name__}: {err}", flush=True)
            rows[method] = {"method": method, "error": f"{type(err).__name__}: {str(err)[:160]}"}
            continue
        if use_gradient_checkpointing(cfg):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        steps[method] = step_fn(
            model, fixed_batch(args.batch, args.seq_len, model.config.vocab_size), cfg.trainer.lr
        )
        for _ in range(args.warmup):  # allocator and optimiser state warm-up
            steps[method]()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        calls, flops = trace_step(steps[method])
        rows[method] = {"method": method, "times": [], "peak_extra_mib": 0.0, "trainable": trainable,
                        "calls": calls, "flops": flops}  # fmt: skip
        del model
    for round_, method in interleaved(list(steps), args.steps):
        with PeakRSS() as mem:  # the other methods' models are idle: the extra is this step's own
            start = time.perf_counter()
            steps[method]()
            rows[method]["times"].append(time.perf_counter() - start)
        rows[method]["peak_extra_mib"] = max(rows[method]["peak_extra_mib"], mem.extra_mib)
        print(f"  round {round_ + 1}: {method} {rows[method]['times'][-1]:.2f}s", flush=True)
    lora_calls = rows.get("lora", {}).get("calls")
    for row in rows.values():
        if "calls" in row:
            calls = row.pop("calls")
            row["ops_vs_lora"] = calls_differing(calls, lora_calls) if lora_calls is not None else None
    return [rows[m] for m in methods if m in rows]


@torch.no_grad()
def linear_floor_s(model: torch.nn.Module, reps: int) -> float:
    """Seconds per token of every nn.Linear in `model` at batch 1 (the decoding floor of its weights)."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    inputs = [torch.randn(1, 1, m.in_features, dtype=m.weight.dtype) for m in linears]
    for m, x in zip(linears, inputs, strict=True):  # warm-up
        torch.nn.functional.linear(x, m.weight, m.bias)
    start = time.perf_counter()
    for _ in range(reps):
        for m, x in zip(linears, inputs, strict=True):
            torch.nn.functional.linear(x, m.weight, m.bias)
    return (time.perf_counter() - start) / reps


def bench_decoding(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy batch-1 decoding time per token (no early stop, prefill excluded) vs the linear-layer floor.

    Both decoders run on the evaluation model (LoRA merged, as `generate` does): the lean greedy loop
    of the evaluation path and `model.generate` (transformers' loop) for comparison.
    """
    _, model, task = build_method(args, "lora")
    model.eval()
    question = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether?")  # fmt: skip
    batch = task.tokenizer(metamath_eval_prompt(question), return_tensors="pt")
    n, pad = args.decode_tokens, task.tokenizer.pad_token_id

    def lean(k: int) -> None:
        greedy_tokens(model, batch["input_ids"], batch["attention_mask"], k, None, pad)  # eos None: k tokens

    def stock(k: int) -> None:
        model.generate(
            **batch, max_new_tokens=k, min_new_tokens=k, do_sample=False, top_k=None, pad_token_id=pad
        )

    def seconds(fn: Callable[[int], None], k: int) -> float:
        start = time.perf_counter()
        fn(k)
        return time.perf_counter() - start

    with torch.no_grad(), merged_adapters(model):
        lean(2), stock(2)  # warm-up
        timings = {}  # per generated token after the first: (t(n) - t(1)) / (n - 1) leaves the prefill out
        for name, fn in (("lean", lean), ("generate", stock)):
            timings[name] = (seconds(fn, n) - seconds(fn, 1)) / (n - 1)
        floor = linear_floor_s(model, reps=args.floor_reps)
    row = {"new_tokens": n, "decode_ms_per_token": 1e3 * timings["lean"], "tokens_per_s": 1 / timings["lean"],
           "generate_ms_per_token": 1e3 * timings["generate"], "linear_floor_ms": 1e3 * floor,
           "ratio_to_floor": timings["lean"] / floor, "generate_ratio_to_floor": timings["generate"] / floor}  # fmt: skip
    print(f"  decoding: {n} tokens, lean {row['decode_ms_per_token']:.1f} ms/token ({row['tokens_per_s']:.1f} "
          f"tokens/s), model.generate {row['generate_ms_per_token']:.1f} ms/token; linear floor "
          f"{row['linear_floor_ms']:.1f} ms/token; ratios {row['ratio_to_floor']:.2f}x / "
          f"{row['generate_ratio_to_floor']:.2f}x", flush=True)  # fmt: skip
    return row


def bench_eval(args: argparse.Namespace) -> dict[str, Any]:
    """GSM8K through the task's `evaluate` at the configured evaluation batch size."""
    cfg, model, task = build_method(args, "lora")
    new_tokens = [f"eval.max_new_tokens={args.eval_max_new_tokens}"] if args.eval_max_new_tokens else []
    eval_cfg = compose_config([f"eval.limit={args.eval_limit}", *new_tokens,
                               *([f"eval.batch_size={args.eval_batch}"] if args.eval_batch else [])]).eval  # fmt: skip
    task.cfg.eval_sets = ["gsm8k"]
    if args.eval_max_new_tokens:  # the task's own setting (metamath: 512, as MetaMath) wins over eval's
        task.cfg.max_new_tokens = args.eval_max_new_tokens
    start = time.perf_counter()
    metrics = task.evaluate(model, eval_cfg)
    seconds = time.perf_counter() - start
    row = {"n": int(metrics["gsm8k/n"]), "batch_size": eval_cfg.batch_size, "seconds": seconds,
           "samples_per_s": metrics.get("throughput/gsm8k/samples_per_s", metrics["gsm8k/n"] / seconds),
           "max_new_tokens": task.max_new_tokens(eval_cfg)}  # fmt: skip
    print(f"  gsm8k: {row['n']} problems at batch {row['batch_size']} (max {row['max_new_tokens']} new tokens) "
          f"in {seconds:.1f}s: {row['samples_per_s']:.3f} samples/s", flush=True)  # fmt: skip
    return row


def report(args: argparse.Namespace, train: list[dict], decode: dict | None, evals: dict | None) -> str:
    lines = [f"# bench_train: {args.model}, rank {args.rank}, batch {args.batch} x {args.seq_len}, "
             f"{torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}", ""]  # fmt: skip
    if train:
        lora = next((r for r in train if r["method"] == "lora" and "times" in r), None)
        lines += ["| method | step (s, median) | vs lora (median per round [min-max]) | FLOPs vs lora | "
                  "aten calls differing from lora's | peak extra (MiB) | trainable |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in train:
            if "times" not in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
                continue
            vs = ratio(r["times"], lora["times"], digits=3) if lora else "-"
            flops = f"{r['flops'] / lora['flops']:.4f}x" if lora else "-"
            lines.append(f"| {r['method']} | {statistics.median(r['times']):.3f} | {vs} | {flops} | "
                         f"{r['ops_vs_lora']} | {r['peak_extra_mib']:.0f} | {r['trainable']} |")  # fmt: skip
        lines.append("")
    if decode:
        lines.append(f"Decoding (batch 1, greedy, {decode['new_tokens']} tokens, prefill excluded): lean loop "
                     f"{decode['decode_ms_per_token']:.1f} ms/token = {decode['tokens_per_s']:.1f} tokens/s "
                     f"({decode['ratio_to_floor']:.2f}x the floor); model.generate {decode['generate_ms_per_token']:.1f} "
                     f"ms/token ({decode['generate_ratio_to_floor']:.2f}x); linear-layer floor "
                     f"{decode['linear_floor_ms']:.1f} ms/token")  # fmt: skip
    if evals:
        lines.append(f"GSM8K evaluation: {evals['n']} problems at batch {evals['batch_size']}, max "
                     f"{evals['max_new_tokens']} new tokens: {evals['samples_per_s']:.3f} samples/s "
                     f"({evals['seconds']:.1f} s)")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="metamath")
    p.add_argument("--methods", nargs="+", default=["all"], help="registered method names, or all")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--steps", type=int, default=3, help="timed optimiser steps per method, one per round of all methods"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--calib-n", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--floor-reps", type=int, default=20)
    p.add_argument("--eval-limit", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=0, help="0: the configured eval.batch_size")
    p.add_argument("--eval-max-new-tokens", type=int, default=0, help="0: the task's (metamath: 512)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "decode", "eval"])
    p.add_argument("--cache-dir", default=tempfile.mkdtemp(prefix="bench-train-"),
                   help="statistics cache (fresh by default so no method reuses another run's)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    return_freed_memory()  # as the trainer does: freed activations leave the process
    methods = registered_methods() if args.methods == ["all"] else args.methods
    methods = ["lora"] + [m for m in methods if m != "lora"]  # the baseline first
    print(f"[bench_train] {args.model}: methods {methods}", flush=True)
    decode = None if "decode" in args.skip else bench_decoding(args)
    evals = None if "eval" in args.skip else bench_eval(args)
    train = [] if "train" in args.skip else bench_training(args, methods)
    text = report(args, train, decode, evals)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
