"""The one build path: `build_trainable(model, method, ctx) -> (peft_model, BuildReport)`.

For every registered method (contract in `astra.methods`):

1. `method.check(cfg)`; the LoRA config; the targets: the base model's `nn.Linear` layers matched by
   PEFT's own rule (`check_target_module_exists`), every target pattern matching at least one layer;
2. statistics the method declares (`needs`) from `astra.stats.collect_statistics` on the calibration
   batches, streamed layer by layer in model order;
3. optional `method.reduce` per layer, through the content cache (`astra.cache.TensorCache`, keyed by
   model id, weight fingerprints, layer names, calibration digest, statistic and reduce options; never
   the rank or the selection, so a rank or selection ablation computes the statistics once);
4. optional rank allocation (`method.allocate`), which must precede the PEFT wrap;
5. the PEFT wrap, then per layer the pure `method.init(W, stats, spec)`, its factors written at once;
6. the per-layer report and one timing helper (`timed`).

Memory: without rank allocation, the wrap happens before the statistics stream starts and each layer's
init is written as its statistics arrive, so at most one block's statistics are alive (the engine may
run block k+1 after block k's function-preserving inits are in). Rank allocation needs every layer's
spectrum before the wrap: the summaries then go to the content cache and are read back one layer at a
time, for the allocation and again for the inits (memory: one layer's summary); with the cache off they
are all held in memory (Astra: eigenvalues and eigenvectors, up to d_out^2 per layer).

Exceptions: full fine-tuning (`trains_adapters = False`) only unfreezes the model; a method with its
own `build` (EVA, see `baselines/eva.py` for why) is timed and reported here and nothing else.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from astra.common import PEFT_PREFIX
from astra.guards import check_finite_init
from astra.methods import BuildContext, BuildReport, InitMethod, LayerSpec, LoraInit, Reduced

ADAPTER = "default"


@contextmanager
def timed(report: BuildReport, key: str) -> Iterator[None]:
    """Add the wall time of the block to `report.extra["timings"][key]` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings = report.extra.setdefault("timings", {})
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def build_trainable(model: nn.Module, method: InitMethod, ctx: BuildContext) -> tuple[nn.Module, BuildReport]:
    """The trainable model of `method` on `model` (wrapped in place by PEFT) and how it was built."""
    report = BuildReport()
    start = time.perf_counter()
    method.check(ctx.cfg.method)
    if not method.trains_adapters:
        for param in model.parameters():
            param.requires_grad_(True)
        trainable = model
    elif callable(getattr(method, "build", None)):  # the documented whole-model exception (EVA)
        trainable, report = method.build(model, ctx)
    else:
        trainable = build_lora(model, method, ctx, report)
    report.init_seconds = time.perf_counter() - start
    return trainable, report


def build_lora(model: nn.Module, method: InitMethod, ctx: BuildContext, report: BuildReport) -> nn.Module:
    """Steps 1-6 of the module docstring for a per-layer method."""
    m = ctx.cfg.method
    config = lora_config(method, ctx)
    targets = target_linears(model, config)
    cached: dict[str, Any] = {}
    per_layer = layer_inputs(model, targets, method, ctx, report, cached)
    if method.allocates(m):
        summaries = every_summary(per_layer, cached)  # all spectra before the wrap (module docstring)
        with timed(report, "allocate"):
            ranks = method.allocate(summaries, targets, m)
        report.extra["rank_allocation"] = ranks
        config.rank_pattern = {re.escape(n): r for n, r in ranks.items()}  # PEFT reads keys as regexes
        per_layer = ((n, summaries.pop(n)) for n in targets)
    with timed(report, "wrap"):
        peft_model = get_peft_model(model, config)
        method.wrapped(peft_model, m)
    layers = wrapped_layers(peft_model, targets)
    for name, stats in per_layer:
        layer = layers[name]
        spec = LayerSpec(name=name, rank=layer.r[ADAPTER], scaling=layer.scaling[ADAPTER], method=m)
        with timed(report, "init"):
            init = method.init(layer.get_base_layer().weight, stats, spec)
            if init is not None:
                check_finite_init(name, init)  # a NaN eigenvector must fail the build, not train
                apply_init(layer, init)
        report.layers[name] = {"rank": spec.rank, **(init.info if init is not None else {})}
        del stats
    return peft_model


# --------------------------------------------------------------------------------------------
# PEFT glue
# --------------------------------------------------------------------------------------------


def lora_config(method: InitMethod, ctx: BuildContext) -> LoraConfig:
    """The `peft.LoraConfig` of a run: shared rank/alpha/dropout/targets + the method's `peft_kwargs`."""
    m, model = ctx.cfg.method, ctx.cfg.model
    targets = list(m.target_modules or model.target_modules)
    if not targets:
        raise ValueError(
            f"model {model.name!r} declares no target_modules and method.target_modules is unset"
        )
    return LoraConfig(
        r=m.rank,
        lora_alpha=m.alpha,
        lora_dropout=m.dropout,
        use_rslora=m.use_rslora,
        target_modules=targets,
        rank_pattern=dict(m.rank_pattern),
        task_type=ctx.task_type,
        **method.peft_kwargs(m),
    )


def target_linears(model: nn.Module, config: LoraConfig) -> dict[str, nn.Linear]:
    """The base model's nn.Linear layers PEFT will wrap for `config`, in model order (PEFT's rule).

    Fails naming the pattern when a target pattern matches no linear layer (a typo would otherwise
    silently adapt fewer layers).
    """
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    targets = {n: mod for n, mod in linears.items() if bool(check_target_module_exists(config, n))}
    patterns = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    for pattern in sorted(patterns):
        single = copy.copy(config)
        single.target_modules = pattern if isinstance(config.target_modules, str) else {pattern}
        if not any(bool(check_target_module_exists(single, n)) for n in linears):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(
                f"target module {pattern!r} matches no linear layer; linear layer names end in: {suffixes}"
            )
    return targets


def wrapped_layers(peft_model: nn.Module, targets: dict[str, nn.Linear]) -> dict[str, LoraLayer]:
    """LoRA layers by base-model name; they must be exactly the targets (else PEFT matched differently)."""
    layers = {
        n.removeprefix(PEFT_PREFIX): mod
        for n, mod in peft_model.named_modules()
        if isinstance(mod, LoraLayer)
    }
    if set(layers) != set(targets):
        raise RuntimeError(f"PEFT wrapped {sorted(set(layers) ^ set(targets))} differently from the targets")
    return layers


@torch.no_grad()
def apply_init(layer: LoraLayer, init: LoraInit, adapter: str = ADAPTER) -> None:
    """Write A, B (and the residual base weight) into a PEFT LoRA layer, keeping dtypes."""
    targets = [(layer.lora_A[adapter].weight, init.A), (layer.lora_B[adapter].weight, init.B)]
    if init.residual is not None:
        targets.append((layer.get_base_layer().weight, init.residual))
    for param, value in targets:
        if param.shape != value.shape:
            raise ValueError(f"init shape {tuple(value.shape)} does not match parameter {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


# --------------------------------------------------------------------------------------------
# statistics -> (cached) reduction, per layer
# --------------------------------------------------------------------------------------------


def calibration(
    ctx: BuildContext, method: InitMethod, limit: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The run's calibration batches (the samples Astra sees), the first `limit` of them."""
    if ctx.calib_batches is None:
        raise ValueError(f"method {method.name!r} needs {method.needs} statistics but the build context "
                         "has no calibration batches")  # fmt: skip
    batches = list(ctx.calib_batches())
    if not batches:
        raise ValueError(f"method {method.name!r}: the calibration set is empty (check calib.n / calib.path)")
    return batches[:limit] if limit else batches


class CachedSummaries:
    """Every layer's `Reduced`, read from a content-cache entry one layer at a time (`pop` reads too)."""

    def __init__(self, reader: Any):
        self.reader = reader

    def __getitem__(self, name: str) -> Reduced:
        tensors, meta = self.reader[name]
        return Reduced(tensors=tensors, meta=meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader)

    def __len__(self) -> int:
        return len(self.reader)

    def items(self) -> Iterator[tuple[str, Reduced]]:
        return ((name, self[name]) for name in self)

    pop = __getitem__


def every_summary(per_layer: Iterator[tuple[str, Any]], cached: dict[str, Any]) -> Any:
    """Every layer's summary, for a rank allocation: with a content cache, the stream is drained into the
    cache and read back lazily (memory: one layer's summary); without one, all are held in memory."""
    held = {name: item for name, item in per_layer if "reader" not in cached}
    if "reader" not in cached:
        return held
    reader = cached["reader"]()
    if reader is None:
        raise RuntimeError("the content-cache entry written for the rank allocation cannot be read back")
    return CachedSummaries(reader)


def layer_inputs(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    method: InitMethod,
    ctx: BuildContext,
    report: BuildReport,
    cached: dict[str, Any] | None = None,
) -> Iterator[tuple[str, Any]]:
    """`(name, what method.init takes)` per target in model order: None, LayerStats or a `Reduced`.

    Lazy: nothing is collected before the first item is requested (the caller wraps the model first).
    With a content cache, `cached["reader"]` is set to a function that opens the entry (once written).
    """
    if method.needs == "none":
        yield from ((name, None) for name in targets)
        return
    from astra.stats import calibration_summary

    m = ctx.cfg.method
    batches = calibration(ctx, method, method.calibration_limit(m))
    options = method.stat_options(m)
    report.extra.update(calibration_summary(batches, options))
    report.extra["calib_batches_used"] = len(batches)
    stream = collect(model, targets, method.needs, batches, options, m)
    if method.reduce is None:
        yield from timed_stream(stream, report, "statistics")
        return
    cache, material = content_cache(method, ctx, targets, batches, options)
    entry = cache.reader(material) if cache is not None else None
    report.extra["cache"] = "off" if cache is None else ("hit" if entry is not None else "miss")
    if cache is not None and cached is not None:
        cached["reader"] = lambda: cache.reader(material)
    if entry is not None:
        for name in targets:
            tensors, meta = entry[name]
            yield name, Reduced(tensors=tensors, meta=meta)
        return
    with cache.writer(material) if cache is not None else nullcontext() as writer:
        for name, stats in timed_stream(stream, report, "statistics"):
            with timed(report, "reduce"):
                reduced = method.reduce(stats, m)
            del stats
            if writer is not None:
                writer.add(name, reduced.tensors, reduced.meta)
            yield name, reduced


def timed_stream(
    stream: Iterator[tuple[str, Any]], report: BuildReport, key: str
) -> Iterator[tuple[str, Any]]:
    """`stream`, with the time spent producing its items added to the timing `key`."""
    while True:
        with timed(report, key):
            item = next(stream, None)
        if item is None:
            return
        yield item


def collect(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    kind: str,
    batches: list,
    options: Any,
    method_cfg: Any,
) -> Iterator[tuple[str, Any]]:
    """`astra.stats.collect_statistics` with the method's `stats_engine` / `stats_offload` (or the defaults)."""
    from astra.stats import collect_statistics

    fields = {"engine": "stats_engine", "offload": "stats_offload"}
    kwargs = {k: str(getattr(method_cfg, f)) for k, f in fields.items() if getattr(method_cfg, f, None)}
    return collect_statistics(model, targets, kind, batches, options, **kwargs)


def content_cache(
    method: InitMethod, ctx: BuildContext, targets: dict[str, nn.Linear], batches: list, options: Any
) -> tuple[Any, dict[str, Any]]:
    """(TensorCache or None when off, key material). Rank and selection never enter the key."""
    from astra.cache import TensorCache, weight_fingerprint
    from astra.calib import batches_digest

    m = ctx.cfg.method
    if not (getattr(m, "cache", False) and ctx.cache_dir):
        return None, {}
    material = {
        "kind": f"{type(method).__name__}.reduce/v4",  # v4: boundary resolution counts the eigensolve
        "model_id": ctx.model_id,
        "layers": {
            n: [lin.out_features, lin.in_features, weight_fingerprint(lin.weight)]
            for n, lin in targets.items()
        },
        "calib_digest": batches_digest(batches),
        "stats": options.as_dict() if hasattr(options, "as_dict") else dict(options),
        "reduce": method.reduce_options(m),
    }
    return TensorCache(ctx.cache_dir, "reduce"), material
