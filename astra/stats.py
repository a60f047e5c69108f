"""Calibration statistics of target linear layers: one engine for every data-driven init.

Kinds (`StatKind`): `output_cov` (Astra), `input_cov` (CorDA), `grad` (LoRA-GA's batch-averaged dL/dW).
For a layer with activations `y` (one row per token, d columns) a covariance is

    C = (sum_t y_t y_t^T - [centered] (sum_t y_t)(sum_t y_t)^T / n_tokens) / normaliser

- `centered`: subtract the token mean (paper Eq. 2: E[yy^T] - E[y]E[y]^T when normaliser = tokens);
- `sample_norm=max_abs`: each calibration sample's rows divided by `abs(max(Y))` first (the
  release's `output / torch.max(output).abs()`: the absolute value *of the maximum*, not max |Y|),
  i.e. a per-sample weight `w_s = 1 / max(Y_s)^2` on its outer products and `1/|max(Y_s)|` on its sum;
- `mask_padding`: drop padded positions (attention_mask = 0); the release keeps them;
- `normalizer`: `tokens` (rows that entered the sum) or `forwards` (calibration samples; the release
  divides by its number of forward calls at batch size 1);
- `accum_dtype`: fp32 | fp64 | model (the model's own dtype, the release's `use_float16_for_covariance`).

**Shared input statistics** (`accumulate=auto`). Layers that read the same input tensor (q/k/v; gate/up)
form a group. For `y = W x + b = W_aug x_aug` with `x_aug = [x; 1]` and `W_aug = [W | b]`:

    sum_t w_s y_t y_t^T = W_aug (sum_t w_s x_aug x_aug^T) W_aug^T,   sum_t y_t/|m_s| = W_aug sum_t x_aug/|m_s|

exactly, so the centred, normalised output covariance is `C_out = W_aug P W_aug^T` with `P` the same
finish applied to the augmented input moment (`LayerStats.input_moment`). Per group the engine
accumulates whichever costs fewer multiply-adds per token: one `(d_in+1)^2` input moment, or the
direct `sum d_out^2` output moments (for SmolLM2: gate/up 0.33M vs 4.7M, q/k/v 0.33M vs 0.41M,
o/down direct). With `sample_norm=max_abs` the weights differ per layer (each from its own output):
the engine forms each sample's Gram `X_s^T X_s` once and adds `w_{l,s} X_s^T X_s` per layer (d_in^2
per *sample*, not per token). `accumulate=direct` keeps output accumulation, and `accum_dtype=model`
always does (bit-faithful to the release's bf16 rounding); the choice is exact, so not in the signature.

**Engines.** `sequential` (default) calibrates as GPTQ/SparseGPT do: the inputs of the first block
(hidden states and every keyword argument the block receives) are captured once by a forward
pre-hook on the real model forward, which is then stopped; each block runs on the cached inputs
(one calibration batch at a time) with hooks on its targets, its statistics are finished and
yielded, and its outputs (taken during that same run) become the next block's inputs. Between
blocks the hidden states wait on the model's device, in host memory or in an unlinked temporary file
(`Offload`; the bytes are the same). Every calibration token passes every block once. **One pass
suffices**: the outputs of block k are
computed before block k's statistics are yielded, i.e. before the consumer can touch block k, so
they are the *base* model's outputs; a function-preserving init written by the consumer would only
reproduce them up to rounding, so a second run after the init could only add rounding, never
remove a difference (pinned by `tests/test_stats.py::test_consumer_writes_do_not_change_later_statistics`,
where the consumer even zeroes each block's weights). `forward` hooks all targets at once on full
model forwards. Targets outside the blocks (pooler, classifier) and models whose blocks cannot run
in isolation (per-layer attention kinds, encoder-decoder) use `forward`, automatically and logged.

Non-finite values raise `NonFiniteStatisticsError` naming the layer and the calibration batch. The
checks cost O(d) per batch, not O(tokens x d): a target's weights are checked once when its hooks are
installed, each batch's first-moment sums (a d-vector, into which any NaN/inf of the rows propagates)
after every batch, the second-moment sums (overflow of finite values) and each finished output
covariance once.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from astra import distributed
from astra.common import trim_heap
from astra.models import eval_mode, model_device

log = logging.getLogger("astra.stats")


class StatKind(StrEnum):
    none = "none"
    output_cov = "output_cov"
    input_cov = "input_cov"
    grad = "grad"


class SampleNorm(StrEnum):
    none = "none"
    max_abs = "max_abs"


class Normalizer(StrEnum):
    tokens = "tokens"
    forwards = "forwards"


class AccumDtype(StrEnum):
    fp32 = "fp32"
    fp64 = "fp64"
    model = "model"


class Accumulate(StrEnum):
    auto = "auto"  # per group the cheaper of shared input moment / direct output moments (exact)
    direct = "direct"  # output moments per layer (the release's arithmetic and rounding)


class Engine(StrEnum):
    sequential = "sequential"  # block by block on cached block inputs (one pass)
    forward = "forward"  # hooks on all targets during full model forwards


class Offload(StrEnum):
    """Where the sequential engine keeps the cached hidden states between blocks (exact either way)."""

    none = "none"  # on the model's device
    cpu = "cpu"  # host memory (a GPU model: frees N x L x d_model of accelerator memory)
    disk = "disk"  # an unlinked temporary file (host RAM: only the batch being replayed)


KINDS = {"output_cov": "output", "input_cov": "input"}
SAMPLE_NORMS = tuple(SampleNorm)
NORMALIZERS = tuple(Normalizer)
ACCUM_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "model": None}
GROUPINGS = ("block", "all")  # legacy `stream_covariances` grouping
ACCUMULATES = tuple(Accumulate)
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache")  # never replayed into a block


@dataclass(frozen=True)
class StatOptions:
    """How activations become a statistic (defaults: the paper's text)."""

    side: str = "output"  # output | input activations of the module
    centered: bool = True
    sample_norm: str = "none"
    mask_padding: bool = True
    normalizer: str = "tokens"
    accum_dtype: str = "fp32"
    accumulate: str = "auto"  # auto | direct (exact either way: not in the run signature)
    grad_micro_batch: int | None = None  # kind=grad: samples per backward (None: the calibration batch)

    def __post_init__(self) -> None:
        checks = [("side", self.side, ("output", "input")), ("sample_norm", self.sample_norm, SAMPLE_NORMS),
                  ("normalizer", self.normalizer, NORMALIZERS), ("accum_dtype", self.accum_dtype, tuple(ACCUM_DTYPES)),
                  ("accumulate", self.accumulate, ACCUMULATES)]  # fmt: skip
        for field_name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"statistics option {field_name}={value!r}; valid: {', '.join(valid)}")
        if self.grad_micro_batch is not None and self.grad_micro_batch < 1:
            raise ValueError(f"statistics option grad_micro_batch={self.grad_micro_batch} must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        """Options that can change the statistic (accumulate / micro-batching are exact: left out)."""
        d = asdict(self)
        d.pop("accumulate")
        d.pop("grad_micro_batch")
        return {k: str(v) if isinstance(v, StrEnum) else v for k, v in d.items()}


def stat_options(method_cfg: Any, kind: str = "output_cov") -> StatOptions:
    """Statistic options from a method config (fields it lacks take the paper's defaults)."""
    if kind not in tuple(StatKind):
        raise ValueError(f"statistics kind {kind!r}; valid: {', '.join(StatKind)}")
    default = StatOptions()
    get = method_cfg.get if hasattr(method_cfg, "get") else lambda k, d: getattr(method_cfg, k, d)
    fields = ("centered", "sample_norm", "mask_padding", "normalizer", "accum_dtype", "accumulate",
              "grad_micro_batch")  # fmt: skip
    values = {f: get(f, getattr(default, f)) for f in fields}
    values = {k: str(v) if isinstance(v, StrEnum) else v for k, v in values.items()}
    return StatOptions(side=KINDS.get(kind, "output"), **values)


class NonFiniteStatisticsError(FloatingPointError):
    """NaN or inf in calibration statistics (names the layer and the calibration batch)."""


NonFiniteActivationError = NonFiniteStatisticsError  # former name


class LayerStats:
    """What a method's init/reduce receives for one layer.

    matrix: output_cov (d_out, d_out) | input_cov (d_in, d_in) | grad (d_out, d_in), finished. On the
        shared-input route it is formed (W_aug P W_aug^T, d_out^2 d_in) on first read only: a consumer
        that decomposes through `input_moment` (astra.eigen's range solver) never pays for it.
    input_moment: output_cov formed from the shared input moment only: P ((d_in+1), (d_in+1)), the
        finished (centred, normalised) moment of x_aug = [x; 1], with matrix = weight_aug P weight_aug^T.
    weight_aug: [W | b] (d_out, d_in+1) in the accumulation dtype (b = 0 without a bias), with input_moment.
    Input covariances of layers that share an input are the same tensor object (do not modify in place).
    """

    def __init__(
        self,
        name: str,
        kind: str,
        matrix: torch.Tensor | Callable[[], torch.Tensor] | None,
        tokens: int,
        samples: int,
        input_moment: torch.Tensor | None = None,
        weight_aug: torch.Tensor | None = None,
        route: str = "direct",
    ):
        self.name, self.kind, self.tokens, self.samples = name, kind, tokens, samples
        self._matrix = matrix  # a tensor, None, or a zero-argument function forming it on first read
        self.input_moment, self.weight_aug, self.route = input_moment, weight_aug, route

    @property
    def matrix(self) -> torch.Tensor | None:
        if callable(self._matrix):
            self._matrix = self._matrix()
        return self._matrix

    @matrix.setter
    def matrix(self, value: torch.Tensor | None) -> None:
        self._matrix = value

    @property
    def dim(self) -> int:
        """Rows of the statistic (d_out for output_cov and grad, d_in for input_cov), without forming it."""
        return self.weight_aug.shape[0] if callable(self._matrix) else self.matrix.shape[0]

    def __repr__(self) -> str:
        return (
            f"LayerStats(name={self.name!r}, kind={self.kind!r}, route={self.route!r}, tokens={self.tokens})"
        )


# --------------------------------------------------------------------------------------------
# accumulators
# --------------------------------------------------------------------------------------------


def accum_dtype(options: StatOptions, model_dtype: torch.dtype) -> torch.dtype:
    return ACCUM_DTYPES[options.accum_dtype] or model_dtype


def keep_mask(
    name: str, y: torch.Tensor, mask: torch.Tensor | None, options: StatOptions
) -> torch.Tensor | None:
    """(batch, seq) bool: rows that enter the sums; None when all do (no mask, mask_padding off, or no
    padding in the batch), so unpadded batches are summed without masked copies."""
    if not options.mask_padding or mask is None:
        return None
    if tuple(mask.shape) != tuple(y.shape[:2]):
        raise ValueError(
            f"layer {name}: activations {tuple(y.shape)} do not align with the attention mask "
            f"{tuple(mask.shape)}; set mask_padding=false for this layer's statistics"
        )
    keep = mask.to(device=y.device, dtype=torch.bool)
    return None if bool(keep.all()) else keep


def sample_max(y: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """max(Y) over each sample's kept rows (`keep` None: all rows): (batch,)."""
    if keep is None:
        return y.amax(dim=(1, 2))
    lowest = torch.finfo(y.dtype).min
    return y.masked_fill(~keep[:, :, None], lowest).amax(dim=(1, 2))


def as_3d(y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(batch, seq, d): a per-sample output (pooler-like, (batch, d)) is one row per sample, unmasked."""
    return (y.unsqueeze(1), None) if y.dim() == 2 else (y, mask)


def check_finite(
    name: str, t: torch.Tensor, batch_index: int, what: str = "statistics", note: str = ""
) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteStatisticsError(
            f"non-finite {what} (NaN or inf) in layer {name!r}{note} at calibration batch {batch_index}"
        )


def finish(
    second: torch.Tensor, first: torch.Tensor, tokens: int, samples: int, o: StatOptions
) -> torch.Tensor:
    """(second - [centered] first first^T / tokens) / (tokens | samples)."""
    scatter = second - torch.outer(first, first) / tokens if o.centered else second
    return scatter / (tokens if o.normalizer == "tokens" else samples)


class CovarianceAccumulator:
    """Direct running sums for one layer: `sum w y y^T` (d, d), `sum sqrt(w) y` (d,), token/sample counts."""

    def __init__(self, name: str, options: StatOptions):
        self.name, self.options = name, options
        self.second: torch.Tensor | None = None  # (d, d)
        self.first: torch.Tensor | None = None  # (d,)
        self.tokens = 0
        self.samples = 0
        self.batches = 0

    def add(self, y: torch.Tensor, mask: torch.Tensor | None, batch_index: int) -> None:
        """Accumulate activations `y` (batch, seq, d) or (batch, d); `mask` (batch, seq) of 0/1."""
        y, mask = as_3d(y, mask)
        dtype = accum_dtype(self.options, y.dtype)
        y = y.detach().to(dtype)
        keep = keep_mask(self.name, y, mask, self.options)
        if self.options.sample_norm == "max_abs":
            y = y / sample_max(y, keep).abs()[:, None, None]
        rows = y.reshape(-1, y.shape[-1]) if keep is None else y[keep]  # (tokens, d)
        if self.second is None:
            d = rows.shape[-1]
            self.second = torch.zeros(d, d, dtype=dtype, device=rows.device)
            self.first = torch.zeros(d, dtype=dtype, device=rows.device)
        self.second += rows.T @ rows
        self.first += rows.sum(0)
        self.tokens += rows.shape[0]
        self.samples += y.shape[0]
        self.batches = batch_index + 1
        check_finite(self.name, self.first, batch_index)  # any NaN/inf in y propagates into its sum

    def covariance(self) -> torch.Tensor:
        """C (d, d) in the accumulation dtype (see the module docstring for the formula)."""
        if self.second is None or self.tokens == 0:
            raise RuntimeError(f"layer {self.name!r} saw no calibration token (was it run by the model?)")
        check_finite(self.name, self.second, self.batches - 1)  # finite y whose squares overflowed
        return finish(self.second, self.first, self.tokens, self.samples, self.options)


class SharedInputAccumulator:
    """Augmented input moments of a group of layers reading one input (see the module docstring).

    Without sample weights: one `sum x_aug x_aug^T` ((d_in+1)^2) shared by the group. With
    `sample_norm=max_abs`: per layer `sum_s w_{l,s} X_s^T X_s` and `sum_s X_s^T 1 / |m_{l,s}|`, from one
    Gram per sample.
    """

    def __init__(self, names: list[str], options: StatOptions):
        self.names, self.options = names, options
        self.weighted = options.sample_norm == "max_abs"
        keys = names if self.weighted else ["*"]
        self.second: dict[str, torch.Tensor] = dict.fromkeys(keys)  # (d_in+1, d_in+1)
        self.first: dict[str, torch.Tensor] = dict.fromkeys(keys)  # (d_in+1,)
        self.tokens = 0
        self.samples = 0
        self.batches = 0
        self.finished: dict[str, torch.Tensor] = {}  # key -> P, one object for the layers sharing it

    def add(
        self, x: torch.Tensor, ys: dict[str, torch.Tensor], mask: torch.Tensor | None, batch_index: int
    ) -> None:
        """x (batch, seq, d_in) the shared input; ys: name -> (batch, seq, d_out) outputs (for the weights)."""
        x, mask = as_3d(x, mask)
        dtype = accum_dtype(self.options, x.dtype)
        x = x.detach().to(dtype)
        keep = keep_mask(self.names[0], x, mask, self.options)
        x_aug = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        if keep is not None:
            x_aug *= keep[..., None]  # padded rows -> 0
        if self.second[next(iter(self.second))] is None:
            d = x_aug.shape[-1]
            for k in self.second:
                self.second[k] = torch.zeros(d, d, dtype=dtype, device=x.device)
                self.first[k] = torch.zeros(d, dtype=dtype, device=x.device)
        if self.weighted:
            self._add_weighted(x_aug, ys, keep, dtype)
        else:
            flat = x_aug.reshape(-1, x_aug.shape[-1])
            self.second["*"] += flat.T @ flat
            self.first["*"] += flat.sum(0)
        self.tokens += x.shape[0] * x.shape[1] if keep is None else int(keep.sum())
        self.samples += x.shape[0]
        self.batches = batch_index + 1
        shared = f" (its input, shared with {', '.join(self.names[1:])})" if len(self.names) > 1 else ""
        for k in self.first:  # NaN/inf in x (or in a layer's sample weight) propagates into these sums
            name, note = (k, "") if k != "*" else (self.names[0], shared)
            check_finite(name, self.first[k], batch_index, note=note)

    def _add_weighted(
        self, x_aug: torch.Tensor, ys: dict[str, torch.Tensor], keep: torch.Tensor | None, dtype
    ) -> None:
        scale = {}  # name -> (batch,) 1/|max(Y_s)| from the layer's own output
        for name in self.names:
            y, _ = as_3d(ys[name], None)
            scale[name] = 1.0 / sample_max(y.detach().to(dtype), keep).abs()
        for s in range(x_aug.shape[0]):  # one Gram per sample, shared by the group
            gram = x_aug[s].T @ x_aug[s]
            total = x_aug[s].sum(0)
            for name in self.names:
                self.second[name] += scale[name][s] ** 2 * gram
                self.first[name] += scale[name][s] * total

    def finished_moment(self, name: str) -> torch.Tensor:
        """P ((d_in+1), (d_in+1)): the finished moment of x_aug as seen by layer `name`."""
        key = name if self.weighted else "*"
        if self.second[key] is None or self.tokens == 0:
            raise RuntimeError(f"layer {name!r} saw no calibration token (was it run by the model?)")
        if key not in self.finished:
            check_finite(name, self.second[key], self.batches - 1)  # finite x whose squares overflowed
            P = finish(self.second[key], self.first[key], self.tokens, self.samples, self.options)
            check_finite(name, P, self.batches - 1)  # the centring's first first^T can overflow
            self.finished[key] = P
        return self.finished[key]


def weight_aug(layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """[W | b] (d_out, d_in+1) in `dtype` (b = 0 for a layer without bias)."""
    w = layer.weight.detach().to(dtype)
    b = layer.bias.detach().to(dtype) if layer.bias is not None else torch.zeros_like(w[:, 0])
    return torch.cat([w, b[:, None]], dim=1)


# --------------------------------------------------------------------------------------------
# groups of layers reading one input: routing and finishing
# --------------------------------------------------------------------------------------------


class Collector:
    """Hooks on target layers; pending (input, output) pairs are grouped by input identity and flushed
    into accumulators when the hooks move on to another block and at the end of every forward."""

    def __init__(self, targets: dict[str, nn.Linear], kind: str, options: StatOptions):
        self.targets, self.kind, self.options = targets, kind, options
        self.pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.accs: dict[tuple[str, ...], Any] = {}  # group (names) -> accumulator(s)
        self.group_of: dict[str, tuple[str, ...]] = {}
        self.mask: torch.Tensor | None = None
        self.batch_index = 0
        self.seen: set[str] = set()
        self.handles: list[Any] = []

    def __enter__(self) -> Collector:
        for name, layer in self.targets.items():
            params = [p for p in (layer.weight, layer.bias) if p is not None]
            if not all(bool(torch.isfinite(p.detach()).all()) for p in params):  # once per engine pass
                raise NonFiniteStatisticsError(f"non-finite weights (NaN or inf) in layer {name!r}")
            self.handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.pending.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output
            x = args[0]
            last = self.pending[-1] if self.pending else None
            if last and block_key(last[0]) != block_key(name) and all(p[1] is not x for p in self.pending):
                self.flush()  # another block (bounded memory), unless it reads a pending input
            self.pending.append((name, args[0], y))
            self.seen.add(name)

        return hook

    def start_batch(self, mask: torch.Tensor | None, index: int) -> None:
        self.mask, self.batch_index, self.seen = mask, index, set()

    def flush(self) -> None:
        """Group the pending layers by their input tensor and feed the accumulators."""
        groups: list[list[tuple[str, torch.Tensor, torch.Tensor]]] = []
        for item in self.pending:
            for group in groups:
                if group[0][1] is item[1]:
                    group.append(item)
                    break
            else:
                groups.append([item])
        self.pending = []
        for group in groups:
            self._add_group(group)

    def _add_group(self, group: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        names = tuple(n for n, _, _ in group)
        for n in names:
            if self.group_of.setdefault(n, names) != names:
                raise RuntimeError(f"layer {n} read a shared input with {self.group_of[n]}, now with {names}")
        x, ys = group[0][1], {n: y for n, _, y in group}
        acc = self.accs.get(names) or self.accs.setdefault(names, self._new_accumulator(names, x))
        if isinstance(acc, SharedInputAccumulator):
            acc.add(x, ys, self.mask, self.batch_index)
        elif self.kind == "input_cov":
            acc.add(x, self.mask, self.batch_index)
        else:
            for n in names:
                acc[n].add(ys[n], self.mask, self.batch_index)

    def _new_accumulator(self, names: tuple[str, ...], x: torch.Tensor) -> Any:
        if self.kind == "input_cov":  # one input covariance for the whole group
            return CovarianceAccumulator(names[0], self.options)
        if self.route(names, x.dtype) == "shared_input":
            return SharedInputAccumulator(list(names), self.options)
        return {n: CovarianceAccumulator(n, self.options) for n in names}

    def route(self, names: tuple[str, ...], model_dtype: torch.dtype) -> str:
        """shared_input when its (d_in+1)^2 per token beats the direct sum of d_out^2 (output_cov)."""
        if self.options.accumulate == "direct" or self.options.accum_dtype == "model":
            return "direct"  # model dtype: the release's rounding is the point, keep its arithmetic
        d_in = self.targets[names[0]].in_features
        direct = sum(self.targets[n].out_features ** 2 for n in names)
        return "shared_input" if (d_in + 1) ** 2 < direct else "direct"

    def stats(self, names: list[str]) -> Iterator[tuple[str, LayerStats]]:
        """Finish and release the statistics of `names` (every one must have run)."""
        missing = [n for n in names if n not in self.group_of]
        if missing:
            raise RuntimeError(f"layers never ran during calibration: {missing}")
        for name in names:
            group = self.group_of[name]
            acc = self.accs[group]
            distributed.reduce_accumulator(acc)  # sharded calibration (torchrun): the global sums
            yield name, self._layer_stats(name, acc)
            if name == group[-1]:
                del self.accs[group]  # the group is complete: free its sums

    def _layer_stats(self, name: str, acc: Any) -> LayerStats:
        if isinstance(acc, SharedInputAccumulator):
            P = acc.finished_moment(name)
            W = weight_aug(self.targets[name], P.dtype).to(P.device)

            def output_cov() -> torch.Tensor:
                C = W @ P @ W.T
                C = (C + C.T) / 2  # exactly symmetric, as the direct sum is
                check_finite(name, C, acc.batches - 1)
                return C

            return LayerStats(name, self.kind, output_cov, acc.tokens, acc.samples, P, W, "shared_input")
        if isinstance(acc, CovarianceAccumulator):  # input_cov: one matrix for the whole group
            if getattr(acc, "finished", None) is None:
                acc.finished = acc.covariance()
            return LayerStats(name, self.kind, acc.finished, acc.tokens, acc.samples)
        single = acc[name]
        return LayerStats(name, self.kind, single.covariance(), single.tokens, single.samples)


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------


def block_key(name: str) -> str:
    """The transformer block a layer belongs to: its name up to the first numeric component."""
    match = re.match(r"(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name


@dataclass
class BlockPlan:
    """The nn.ModuleList holding the targets, which targets each block holds, and the rest."""

    path: str
    blocks: nn.ModuleList
    members: dict[int, list[str]]  # block index -> target names (model order)
    outside: list[str]  # targets in no block (pooler, classifier, ...)


def block_plan(model: nn.Module, targets: dict[str, nn.Linear]) -> BlockPlan | None:
    """Blocks = the nn.ModuleList (LLaMA `model.layers`, BERT `encoder.layer`) holding most targets."""
    found: dict[str, dict[int, list[str]]] = {}
    for name in targets:
        for m in re.finditer(r"\.(\d+)(?=\.)", name):
            path = name[: m.start()]
            if isinstance(model.get_submodule(path), nn.ModuleList):
                found.setdefault(path, {}).setdefault(int(m.group(1)), []).append(name)
                break
    if not found:
        return None
    path = max(found, key=lambda p: sum(len(v) for v in found[p].values()))
    inside = {n for names in found[path].values() for n in names}
    return BlockPlan(path, model.get_submodule(path), dict(sorted(found[path].items())),
                     [n for n in targets if n not in inside])  # fmt: skip


def isolation_problem(model: nn.Module) -> str | None:
    """Why the blocks cannot be replayed on one captured set of keyword arguments (None: they can)."""
    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or [])
    if len(kinds) > 1:
        return f"blocks receive different attention masks (layer_types {sorted(kinds)})"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    return None


class _StopForward(Exception):
    """Raised by a hook once what it needed has run: the rest of the model is skipped."""


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch without labels (no loss is needed), on the model's device."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def forward_kwargs(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    kwargs: dict[str, Any] = model_inputs(batch, device)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # a KV cache would be written into by replayed blocks
    return kwargs


def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: list[dict[str, torch.Tensor]]
) -> list[tuple[tuple, dict[str, Any]]]:
    """(args, kwargs) the first block receives for each calibration batch, from the real forward."""
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = {k: (None if k in CACHE_KWARGS else v) for k, v in kwargs.items()}
        if captured:  # position embeddings, masks: one object for every batch where they are equal
            kwargs = {k: share_equal(v, captured[-1][1].get(k)) for k, v in kwargs.items()}
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), kwargs))
        raise _StopForward

    device = model_device(model)
    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**forward_kwargs(model, batch, device))
            except _StopForward:
                continue
            raise RuntimeError("the model forward never called its first block")
    finally:
        handle.remove()
    return captured


def share_equal(value: Any, previous: Any) -> Any:
    """`previous` where it equals `value` (tensors, or tuples of them), else `value`: the captured keyword
    arguments of equal-length unpadded batches (LLaMA's cos/sin: 2 x L x d_head per batch) are held once."""
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        shared = tuple(share_equal(v, p) for v, p in zip(value, previous, strict=True))
        return previous if all(s is p for s, p in zip(shared, previous, strict=True)) else shared
    if torch.is_tensor(value) and torch.is_tensor(previous) and value.shape == previous.shape \
            and value.dtype == previous.dtype and torch.equal(value, previous):  # fmt: skip
        return previous
    return value


class HiddenStates:
    """The hidden states entering the current block, one tensor per calibration batch, kept where
    `offload` says. `disk` writes each batch's bytes at a fixed offset of an unlinked temporary file
    (nothing is left behind, even after a crash) and reads them back into a fresh tensor, so only the batch
    being replayed is resident in the process; the file's pages are the kernel's (page cache, evictable).
    """

    def __init__(self, offload: str, device: torch.device):
        if offload not in tuple(Offload):
            raise ValueError(f"statistics offload={offload!r}; valid: {', '.join(Offload)}")
        self.offload, self.device = Offload(offload), device
        self.items: dict[int, Any] = {}  # batch -> tensor | disk: (offset, nbytes, shape, dtype)
        self.file = tempfile.TemporaryFile(prefix="astra-hidden-") if self.offload == Offload.disk else None
        self.end = 0

    def put(self, b: int, hidden: torch.Tensor) -> None:
        if self.offload == Offload.none:
            self.items[b] = hidden
            return
        hidden = hidden.detach().to("cpu")
        if self.offload == Offload.cpu:
            self.items[b] = hidden
            return
        raw = hidden.contiguous().reshape(-1).view(torch.uint8).numpy()
        if b in self.items and self.items[b][1] == raw.nbytes:
            offset = self.items[b][0]  # same size as before: overwrite in place
        else:
            offset, self.end = self.end, self.end + raw.nbytes
        view, done = memoryview(raw), 0
        while done < raw.nbytes:
            done += os.pwrite(self.file.fileno(), view[done:], offset + done)
        self.items[b] = (offset, raw.nbytes, hidden.shape, hidden.dtype)

    def get(self, b: int) -> torch.Tensor:
        if self.offload != Offload.disk:
            return self.items[b].to(self.device)
        offset, nbytes, shape, dtype = self.items[b]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        while done < nbytes:
            got = os.preadv(self.file.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"hidden-state file ended at {offset + done} of {offset + nbytes} bytes")
            done += got
        return buffer.view(dtype).reshape(shape).to(self.device)

    def close(self) -> None:
        self.items.clear()
        if self.file is not None:
            self.file.close()


def hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


# --------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------


def collect_statistics(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    kind: str,
    batches: list[dict[str, torch.Tensor]],
    options: StatOptions,
    engine: str = "sequential",
    offload: str = "none",
) -> Iterator[tuple[str, LayerStats]]:
    """Yield `(name, LayerStats)` for every target, block by block in model order (see the module
    docstring). Statistics are of the unmodified base model; the consumer may write
    function-preserving inits into blocks already yielded. `offload`: where the sequential engine keeps
    the hidden states between blocks (`Offload`)."""
    kind, engine = StatKind(kind), Engine(engine)
    if kind == StatKind.none:
        return
    if distributed.shards(batches):  # torchrun: each rank calibrates on its share, the sums are all-reduced
        yield from distributed.sharded_stream(
            collect_statistics, model, targets, kind, batches, options, engine, offload
        )
        return
    if kind == StatKind.grad:
        yield from gradient_statistics(model, targets, batches, options)
        return
    if not targets:
        raise ValueError("collect_statistics: no target layer")
    plan = block_plan(model, targets) if engine == Engine.sequential else None
    problem = isolation_problem(model) if plan is not None else None
    if engine == Engine.sequential and (plan is None or problem):
        log.info("statistics: sequential engine unavailable (%s); hooks on full forwards",
                 problem or "targets in no nn.ModuleList of blocks")  # fmt: skip
        plan = None
    # no_grad/eval are entered around each model call, never held across a `yield` (grad mode is
    # thread state: held across a yield it would leak into the consumer's code)
    if plan is None:
        yield from forward_statistics(model, targets, kind, batches, options)
        return
    if plan.outside:
        log.info("statistics: %d targets outside the blocks (%s, ...) use a hooked full forward",
                 len(plan.outside), plan.outside[0])  # fmt: skip
    yield from sequential_statistics(model, targets, kind, batches, options, plan, offload)
    if plan.outside:
        yield from forward_statistics(model, {n: targets[n] for n in plan.outside}, kind, batches, options)


def forward_statistics(
    model: nn.Module, targets: dict[str, nn.Linear], kind: str, batches: list, options: StatOptions
) -> Iterator[tuple[str, LayerStats]]:
    """All targets hooked at once; one full forward per batch, stopped after the last target ran."""
    collector = Collector(targets, kind, options)
    device = model_device(model)
    with torch.no_grad(), eval_mode(model), collector:
        for index, batch in enumerate(tqdm(batches, desc=f"calibration {kind} (forward)", leave=False)):
            collector.start_batch(batch.get("attention_mask"), index)
            stop = _stop_when_all_seen(collector, targets)
            try:
                model(**forward_kwargs(model, batch, device))
            except _StopForward:
                pass
            finally:
                stop.remove()
            collector.flush()
    yield from collector.stats(list(targets))


def _stop_when_all_seen(collector: Collector, targets: dict[str, nn.Linear]) -> Any:
    """A hook (after the collector's) that stops the forward once every target has run."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if len(collector.seen) == len(targets):
            raise _StopForward

    handles = [layer.register_forward_hook(hook) for layer in targets.values()]

    class Handles:
        def remove(self) -> None:
            for h in handles:
                h.remove()

    return Handles()


def sequential_statistics(
    model: nn.Module, targets: dict[str, nn.Linear], kind: str, batches: list, options: StatOptions,
    plan: BlockPlan, offload: str = "none",
) -> Iterator[tuple[str, LayerStats]]:  # fmt: skip
    """Capture block 0's inputs once, then run block by block (see the module docstring)."""
    first = min(plan.members)
    with torch.no_grad(), eval_mode(model):
        inputs = capture_block_inputs(model, plan.blocks[first], batches)
    hidden = HiddenStates(offload, model_device(model))
    for b, (args, kwargs) in enumerate(inputs):  # the rest of each batch's arguments stays as captured
        hidden.put(b, hidden_of(args, kwargs))
        inputs[b] = with_hidden(args, kwargs, None)
    progress = tqdm(
        total=(max(plan.members) - first + 1) * len(batches), desc=f"calibration {kind}", leave=False
    )
    try:
        for index in range(first, max(plan.members) + 1):
            block, names = plan.blocks[index], plan.members.get(index, [])
            collector = Collector({n: targets[n] for n in names}, kind, options)
            with torch.no_grad(), eval_mode(block), collector:  # the block: no walk over the whole model
                for b, (args, kwargs) in enumerate(inputs):
                    collector.start_batch(batches[b].get("attention_mask"), b)
                    x = hidden.get(b)
                    block_args, block_kwargs = with_hidden(args, kwargs, x)
                    out = block(*block_args, **block_kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    collector.flush()
                    hidden.put(b, out.detach().to(x.dtype))
                    del x, out
                    progress.update(1)
            for item in collector.stats(names):
                yield item
                trim_heap()  # the consumer's freed temporaries leave the process (docs/performance.md)
            del collector
    finally:
        progress.close()
        inputs.clear()
        hidden.close()


# --------------------------------------------------------------------------------------------
# gradients (LoRA-GA)
# --------------------------------------------------------------------------------------------


def loss_weights(batch: dict[str, torch.Tensor], size: int) -> list[tuple[slice, float]]:
    """Micro-batches of a batch and the weight of each micro-batch's mean loss in the batch's mean loss.

    Token labels (batch, seq) (causal LM, shifted inside the model): weight = the micro-batch's
    labelled next-token positions / the batch's; per-sample labels: its samples / the batch's.
    """
    labels = batch["labels"]
    n = labels.shape[0]
    if labels.dim() >= 2 and labels.shape[:2] == batch["input_ids"].shape[:2]:
        counts = (labels[:, 1:] != -100).sum(1).double()
    else:
        counts = torch.ones(n, dtype=torch.float64)
    total = float(counts.sum())
    if total == 0:
        return []  # no labelled token (e.g. a response cut by seq_len): its mean loss is 0/0
    return [(slice(i, i + size), float(counts[i : i + size].sum()) / total) for i in range(0, n, size)]


def gradient_statistics(
    model: nn.Module, targets: dict[str, nn.Linear], batches: list, options: StatOptions
) -> Iterator[tuple[str, LayerStats]]:
    """Batch-averaged dL/dW (d_out, d_in) per target, as PEFT's `preprocess_loraga` estimates it
    (mean over calibration batches of the gradient of each batch's mean loss, model in eval mode).

    Memory: one (d_out, d_in) sum per target (fp32, or fp64 for an fp64 model); each weight's `.grad` is moved into its sum by a
    post-accumulate hook and freed at once, and only target weights require grad, so autograd keeps
    only the activations those weights need, for one micro-batch (`grad_micro_batch`).
    """
    if any("labels" not in b for b in batches):
        raise ValueError("gradient statistics need labelled calibration batches (a loss to differentiate)")
    sums = {n: torch.zeros_like(t.weight, dtype=torch.promote_types(t.weight.dtype, torch.float32))
            for n, t in targets.items()}  # fmt: skip
    by_param = {id(t.weight): n for n, t in targets.items()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    device = model_device(model)

    def hook(param: torch.Tensor) -> None:
        sums[by_param[id(param)]] += param.grad
        param.grad = None

    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in targets.values():
            t.weight.requires_grad_(True)
            handles.append(t.weight.register_post_accumulate_grad_hook(hook))
        with torch.enable_grad(), eval_mode(model):
            used = 0
            for index, batch in enumerate(tqdm(batches, desc="calibration gradients", leave=False)):
                size = options.grad_micro_batch or batch["input_ids"].shape[0]
                parts = loss_weights(batch, size)
                used += bool(parts)
                for part, weight in parts:
                    if weight == 0:
                        continue  # no labelled token: its mean loss is 0/0 and weighs nothing
                    micro = {k: v[part].to(device) for k, v in batch.items()}
                    loss = model(**micro).loss
                    check_finite("loss", loss.detach(), index, "loss")
                    (loss * weight).backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
            p.grad = None
    if used == 0:
        raise ValueError(
            "no gradient calibration batch has a labelled token (calib.seq_len cuts every response?)"
        )
    if used < len(batches):
        log.warning("gradient statistics: %d of %d calibration batches have no labelled token (PEFT's "
                    "preprocess_loraga would take a NaN loss from them); averaged over the other %d",
                    len(batches) - used, len(batches), used)  # fmt: skip
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
    )
    used, samples, tokens = distributed.reduce_gradients(
        sums, [used, samples, tokens]
    )  # sharded: global sums
    for name in list(sums):
        grad = sums.pop(name) / used
        check_finite(name, grad, len(batches) - 1, "gradient")
        yield name, LayerStats(name, "grad", grad.to(targets[name].weight.dtype), tokens, samples)


# --------------------------------------------------------------------------------------------
# legacy entry points (kept until every consumer calls collect_statistics)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_group(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[dict[str, torch.Tensor]],
    options: StatOptions,
    progress: Any = None,
) -> dict[str, CovarianceAccumulator]:
    """Direct accumulators of `modules` over full forwards of every batch (one per layer)."""
    accs = {name: CovarianceAccumulator(name, options) for name in modules}
    state: dict[str, Any] = {"mask": None, "batch": 0, "seen": set()}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = output if options.side == "output" else args[0]
            y = y[0] if isinstance(y, tuple) else y
            accs[name].add(y, state["mask"], state["batch"])
            state["seen"].add(name)
            if len(state["seen"]) == len(modules):
                raise _StopForward

        return hook

    device = model_device(model)
    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in modules.items()]
    try:
        with eval_mode(model):
            for index, batch in enumerate(batches):
                state.update(mask=batch.get("attention_mask"), batch=index, seen=set())
                try:
                    model(**model_inputs(batch, device))
                except _StopForward:
                    pass
                if progress is not None:
                    progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, acc in accs.items() if acc.second is None]
    if missing:
        raise RuntimeError(f"layers never ran during calibration: {missing}")
    return accs


def layer_groups(names: list[str], grouping: str = "block") -> list[list[str]]:
    """Layers grouped by transformer block (in model order), or one group of all of them."""
    if grouping not in GROUPINGS:
        raise ValueError(f"statistics grouping {grouping!r}; valid: {', '.join(GROUPINGS)}")
    if grouping == "all":
        return [list(names)]
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(block_key(name), []).append(name)
    return list(groups.values())


class _Finished:
    """What `stream_covariances` yields: `.covariance()` and `.tokens` of a finished LayerStats."""

    def __init__(self, stats: LayerStats):
        self.stats, self.tokens, self.samples = stats, stats.tokens, stats.samples

    def covariance(self) -> torch.Tensor:
        return self.stats.matrix


def stream_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[dict[str, torch.Tensor]],
    options: StatOptions,
    grouping: str = "block",
) -> Iterator[tuple[str, Any]]:
    """Former API: `(name, accumulator-like)` through `collect_statistics` (block = sequential)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"statistics grouping {grouping!r}; valid: {', '.join(GROUPINGS)}")
    kind = "output_cov" if options.side == "output" else "input_cov"
    engine = "sequential" if grouping == "block" else "forward"
    linears = {n: (m.get_base_layer() if hasattr(m, "get_base_layer") else m) for n, m in modules.items()}
    for name, stats in collect_statistics(model, linears, kind, batches, options, engine):
        yield name, _Finished(stats)


def layer_statistics(
    peft_model: nn.Module, layers: dict[str, nn.Module], kind: str, ctx: Any, report: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """Former spine hook: `(layer_name, covariance (d, d))` per PEFT LoRA layer."""
    if kind not in KINDS:
        raise ValueError(f"statistics kind {kind!r} is not collected here; valid: {', '.join(KINDS)}")
    if ctx.calib_batches is None:
        raise ValueError(f"method needs {kind} statistics but the build context has no calibration batches")
    batches = list(ctx.calib_batches())
    options = stat_options(ctx.cfg.method, kind)
    report.extra.update(calibration_summary(batches, options))
    grouping = ctx.cfg.method.get("stats_grouping", "block") if hasattr(ctx.cfg.method, "get") else "block"
    for name, acc in stream_covariances(peft_model, layers, batches, options, grouping):
        yield name, acc.covariance()


def calibration_summary(batches: list[dict[str, torch.Tensor]], options: StatOptions) -> dict[str, Any]:
    """Calibration size for the results JSON: samples, real tokens, positions that entered the sums."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(int(b["input_ids"].numel()) for b in batches)
    return {
        "calib_samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "calib_tokens": real,
        "calib_positions": positions,
        "calib_tokens_used": real if options.mask_padding else positions,
        "stat_options": options.as_dict(),
    }
