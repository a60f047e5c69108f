"""Non-finite guards: no run with a NaN/inf loss, gradient, weight or metric is ever recorded as a success.

- `NonFiniteGuard` (a `transformers.TrainerCallback`) stops training at the first optimisation step whose
  gradients (checked before the optimizer applies them) or logged loss / grad-norm are not finite, naming
  the step and the first parameter (in model order) whose gradient is non-finite.
- `check_finite_loss` fails the step-0 check (base model and initialised model) instead of warning.
- `check_finite_weights` refuses to evaluate a model holding NaN/inf weights.
- `check_finite_metrics` fails a run whose evaluation produced a non-finite number.

Every failure raises `NonFiniteError` (a FloatingPointError); the pipeline records the run as `failed`
with the message in `run_info.error`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback


class NonFiniteError(FloatingPointError):
    """A loss, gradient, weight or metric is NaN/inf; the message names the step, layer or metric."""


def first_non_finite(named: Iterable[tuple[str, torch.Tensor | None]]) -> str | None:
    """Name of the first tensor of `named` holding NaN/inf (None when all are finite).

    One device synchronisation for the common all-finite case: the per-tensor max-abs values are stacked
    and checked together; only on failure are they walked to find the first culprit."""
    items = [(name, t) for name, t in named if t is not None and t.is_floating_point() and t.numel()]
    if not items:
        return None
    device = items[0][1].device
    peaks = torch.stack([t.detach().abs().amax().float().to(device) for _, t in items])  # (n_tensors,)
    finite = torch.isfinite(peaks).cpu()
    if bool(finite.all()):
        return None
    return items[int((~finite).nonzero()[0])][0]


def layer_of(param_name: str) -> str:
    """The module a parameter belongs to ('...q_proj.lora_A.default.weight' -> '...q_proj.lora_A.default')."""
    return param_name.rsplit(".", 1)[0]


class NonFiniteGuard(TrainerCallback):
    """Stops at the first non-finite gradient (before the optimizer step) or logged loss / grad-norm.

    Raising from a callback ends `Trainer.train()` with the exception, so the run ends `failed`
    and no weight of a NaN step is ever evaluated. `steps_checked` counts the gradient checks (tests).
    """

    def __init__(self) -> None:
        self.steps_checked = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001 (HF API)
        if model is None:
            return
        self.steps_checked += 1
        bad = first_non_finite((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
        if bad is not None:
            raise NonFiniteError(
                f"non-finite gradient at optimisation step {state.global_step + 1}: first layer "
                f"{layer_of(bad)!r} (parameter {bad!r}); lower trainer.lr or use a wider model.dtype"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                raise NonFiniteError(
                    f"non-finite {key} = {value} logged at optimisation step {state.global_step}"
                )


def check_finite_loss(what: str, value: float) -> None:
    """Raise when the step-0 loss `what` (base model / initialised model) is NaN/inf."""
    if not math.isfinite(value):
        raise NonFiniteError(
            f"{what} = {value} on the probe batch before training: the model, its initialisation or the "
            "labels (all masked after truncation?) are broken"
        )


def check_finite_weights(model: torch.nn.Module, purpose: str = "evaluation") -> None:
    """Refuse `purpose` of a model with a NaN/inf parameter or buffer, naming the first one."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteError(f"refusing {purpose}: weight {bad!r} holds NaN/inf")


def check_finite_metrics(metrics: Mapping[str, float]) -> None:
    """Raise naming every metric that is not a finite number."""
    bad = {k: v for k, v in metrics.items() if not (isinstance(v, int | float) and math.isfinite(v))}
    if bad:
        raise NonFiniteError(f"non-finite metrics {bad}: the run cannot be a success")


def check_finite_init(layer: str, init: Any) -> None:
    """Fail the build when a method's init factors (A, B, residual) of `layer` hold NaN/inf, naming both."""
    tensors = [(key, getattr(init, key, None)) for key in ("A", "B", "residual")]
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteError(
            f"init of layer {layer!r}: factor {bad} holds NaN/inf (non-finite eigenvalues or statistics?)"
        )
