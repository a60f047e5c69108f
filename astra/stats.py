"""Calibration statistics: per-layer covariance of a linear layer's output (or input) activations.

One collection path for every data-driven init (Astra: output covariance; CorDA: input covariance):
forward hooks on the target modules, registered and removed in `try/finally`, fed by the
calibration batches. For a layer with activations `y` (one row per token, d columns):

    C = (sum_t y_t y_t^T - [centered] (sum_t y_t)(sum_t y_t)^T / n_tokens) / normaliser

- `centered`: subtract the token mean (paper Eq. 2: E[yy^T] - E[y]E[y]^T when normaliser = tokens);
- `sample_norm=max_abs`: each calibration sample's rows divided by `abs(max(Y))` first (the
  release's `output / torch.max(output).abs()`: the absolute value *of the maximum*, not max |Y|);
- `mask_padding`: drop padded positions (attention_mask = 0); the release keeps them;
- `normalizer`: `tokens` (rows that entered the sum) or `forwards` (calibration samples; the release
  divides by its number of forward calls at batch size 1);
- `accum_dtype`: fp32 | fp64 | model (the model's own dtype, the release's `use_float16_for_covariance`).

Memory is bounded by collecting one group of layers (a transformer block) at a time: each group's
forwards stop right after the group's last layer has run, and its covariances are handed to the
consumer and dropped before the next group starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from astra.models import eval_mode, model_device

KINDS = {"output_cov": "output", "input_cov": "input"}
SAMPLE_NORMS = ("none", "max_abs")
NORMALIZERS = ("tokens", "forwards")
ACCUM_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "model": None}
GROUPINGS = ("block", "all")


@dataclass(frozen=True)
class StatOptions:
    """How activations become a covariance (defaults: the paper's text)."""

    side: str = "output"  # output | input activations of the module
    centered: bool = True
    sample_norm: str = "none"
    mask_padding: bool = True
    normalizer: str = "tokens"
    accum_dtype: str = "fp32"

    def __post_init__(self) -> None:
        checks = [("side", self.side, ("output", "input")), ("sample_norm", self.sample_norm, SAMPLE_NORMS),
                  ("normalizer", self.normalizer, NORMALIZERS), ("accum_dtype", self.accum_dtype, tuple(ACCUM_DTYPES))]  # fmt: skip
        for field_name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"statistics option {field_name}={value!r}; valid: {', '.join(valid)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stat_options(method_cfg: Any, kind: str = "output_cov") -> StatOptions:
    """Statistic options from a method config (fields it lacks take the paper's defaults)."""
    if kind not in KINDS:
        raise ValueError(f"statistics kind {kind!r} is not a covariance; valid: {', '.join(KINDS)}")
    default = StatOptions()
    get = method_cfg.get if hasattr(method_cfg, "get") else lambda k, d: getattr(method_cfg, k, d)
    fields = ("centered", "sample_norm", "mask_padding", "normalizer", "accum_dtype")
    return StatOptions(side=KINDS[kind], **{f: get(f, getattr(default, f)) for f in fields})


class NonFiniteActivationError(FloatingPointError):
    """NaN or inf in calibration activations (names the layer and the calibration batch)."""


class CovarianceAccumulator:
    """Running sums for one layer: `sum y y^T` (d, d), `sum y` (d,), token and sample counts."""

    def __init__(self, name: str, options: StatOptions):
        self.name, self.options = name, options
        self.second: torch.Tensor | None = None  # (d, d)
        self.first: torch.Tensor | None = None  # (d,)
        self.tokens = 0
        self.samples = 0

    def add(self, y: torch.Tensor, mask: torch.Tensor | None, batch_index: int) -> None:
        """Accumulate activations `y` (batch, seq, d) or (batch, d); `mask` (batch, seq) of 0/1."""
        if y.dim() == 2:  # a per-sample output (pooler-like): one row per sample, nothing to mask
            y, mask = y.unsqueeze(1), None
        dtype = ACCUM_DTYPES[self.options.accum_dtype] or y.dtype
        y = y.detach().to(dtype)
        self._check_finite(y, batch_index, "activations")
        keep = self._keep_mask(y, mask)  # (batch, seq) bool
        if self.options.sample_norm == "max_abs":
            y = y / self._sample_max(y, keep).abs()[:, None, None]
            self._check_finite(y, batch_index, "activations after sample_norm=max_abs (max(Y) = 0?)")
        rows = y[keep]  # (tokens, d)
        if self.second is None:
            d = rows.shape[-1]
            self.second = torch.zeros(d, d, dtype=dtype, device=rows.device)
            self.first = torch.zeros(d, dtype=dtype, device=rows.device)
        self.second += rows.T @ rows
        self.first += rows.sum(0)
        self.tokens += rows.shape[0]
        self.samples += y.shape[0]

    def _keep_mask(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        everything = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        if not self.options.mask_padding or mask is None:
            return everything
        if tuple(mask.shape) != tuple(y.shape[:2]):
            raise ValueError(
                f"layer {self.name}: activations {tuple(y.shape)} do not align with the attention mask "
                f"{tuple(mask.shape)}; set mask_padding=false for this layer's statistics"
            )
        return mask.to(device=y.device, dtype=torch.bool)

    @staticmethod
    def _sample_max(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """max(Y) over each sample's kept rows: (batch,)."""
        lowest = torch.finfo(y.dtype).min
        return y.masked_fill(~keep[:, :, None], lowest).amax(dim=(1, 2))

    def _check_finite(self, y: torch.Tensor, batch_index: int, what: str) -> None:
        if not torch.isfinite(y).all():
            raise NonFiniteActivationError(
                f"non-finite {what} (NaN or inf) in layer {self.name!r} at calibration batch {batch_index}"
            )

    def covariance(self) -> torch.Tensor:
        """C (d, d) in the accumulation dtype (see the module docstring for the formula)."""
        if self.second is None or self.tokens == 0:
            raise RuntimeError(f"layer {self.name!r} saw no calibration token (was it run by the model?)")
        scatter = self.second
        if self.options.centered:
            scatter = scatter - torch.outer(self.first, self.first) / self.tokens
        divisor = self.tokens if self.options.normalizer == "tokens" else self.samples
        return scatter / divisor


class _StopForward(Exception):
    """Raised by a hook once every layer of the group has run: the rest of the model is skipped."""


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch without labels (no loss is needed), on the model's device."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def collect_group(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[dict[str, torch.Tensor]],
    options: StatOptions,
    progress: Any = None,
) -> dict[str, CovarianceAccumulator]:
    """Run every calibration batch through `model` and accumulate the statistics of `modules`."""
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


def block_key(name: str) -> str:
    """The transformer block a layer belongs to: its name up to the first numeric component."""
    match = re.match(r"(.*?\.\d+)(\.|$)", name)
    return match.group(1) if match else name


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


def stream_covariances(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[dict[str, torch.Tensor]],
    options: StatOptions,
    grouping: str = "block",
) -> Iterator[tuple[str, CovarianceAccumulator]]:
    """Yield `(name, accumulator)` group by group; a group is collected only after the previous
    group's accumulators were consumed, so a consumer may modify earlier layers (function-preserving
    inits) and peak memory is one group's covariances."""
    groups = layer_groups(list(modules), grouping)
    progress = tqdm(
        total=len(groups) * len(batches), desc=f"calibration {options.side} covariance", leave=False
    )
    try:
        for group in groups:
            accs = collect_group(model, {n: modules[n] for n in group}, batches, options, progress)
            for name in group:
                yield name, accs.pop(name)
    finally:
        progress.close()


def layer_statistics(
    peft_model: nn.Module, layers: dict[str, nn.Module], kind: str, ctx: Any, report: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """Spine hook for `astra.adapters.init_layers`: `(layer_name, covariance (d, d))` per layer.

    `layers` are the PEFT LoRA layers; at this point their output is `W x + b` (B = 0, or an
    earlier function-preserving init), so block-by-block streaming sees the base model's activations.
    Statistic options come from the method config (`stat_options`); calibration token counts go into
    `report.extra`.
    """
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
