"""Helpers shared by the baselines: PEFT's per-layer initialisers run on one `nn.Linear`, calibration
forwards, and the wrap-then-initialise loop of the data-driven baselines.

PEFT implements most baselines as code that runs inside `LoraLayer.update_layer` on a wrapped layer.
`peft_layer_init` runs exactly that code on a fresh single `nn.Linear` holding a copy of `W` and reads
out (A, B, residual), which turns PEFT's initialisers into pure per-layer functions
`init(weight, stats, spec) -> LoraInit` (testable on one matrix, applied by the shared `apply_init`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from astra.adapters import init_each, lora_config, lora_layers
from astra.methods import BuildContext, BuildReport, InitMethod, LoraInit, Timer

ADAPTER = "default"


def one_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free `nn.Linear` holding a copy of `weight` (d_out, d_in), same dtype and device."""
    d_out, d_in = weight.shape
    layer = nn.Linear(d_in, d_out, bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


@torch.no_grad()
def peft_layer_init(
    weight: torch.Tensor, spec: Any, attach: dict[str, Any] | None = None, **lora_kwargs: Any
) -> LoraInit:
    """Run PEFT's initialiser (`LoraConfig(**lora_kwargs)`) on a single linear layer holding `weight`.

    `attach` sets attributes on the base layer first (PEFT's preprocessing outputs: `eigens` for CorDA,
    `_peft_loraga_grad` for LoRA-GA). Returns A (r, d_in), B (d_out, r) and the residual (d_out, d_in)
    that PEFT leaves in the base layer, so that `W = residual + s * B @ A` up to rounding.
    """
    base = one_linear(weight.detach())
    for key, value in (attach or {}).items():
        setattr(base, key, value)
    # alpha = s * r with plain (non-rs) scaling reproduces the layer's scaling s exactly as PEFT sees it
    config = LoraConfig(r=spec.rank, lora_alpha=spec.scaling * spec.rank, **lora_kwargs)
    layer = PeftLinear(base, ADAPTER, config=config, r=spec.rank, lora_alpha=config.lora_alpha)
    return LoraInit(
        A=layer.lora_A[ADAPTER].weight.detach().clone(),
        B=layer.lora_B[ADAPTER].weight.detach().clone(),
        residual=layer.get_base_layer().weight.detach().clone(),
    )


def residual_init(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> LoraInit:
    """`LoraInit` with the frozen residual `W - s * B @ A` computed in fp32 and cast back to W's dtype."""
    residual = weight.float() - scaling * (B.float() @ A.float())  # (d_out, d_in)
    return LoraInit(A=A, B=B, residual=residual.to(weight.dtype))


def calibration(
    ctx: BuildContext, method_name: str, limit: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The run's calibration batches (`ctx.calib_batches()`, the samples Astra sees), the first `limit`."""
    if ctx.calib_batches is None:
        raise ValueError(f"method {method_name!r} is data-driven but the build context has no calib_batches")
    batches = list(ctx.calib_batches())
    if not batches:
        raise ValueError(f"method {method_name!r}: the calibration set is empty (check calib.n / calib.path)")
    return batches[:limit] if limit else batches


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def without_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def wrap_and_init(
    method: InitMethod,
    model: nn.Module,
    ctx: BuildContext,
    report: BuildReport,
    pop_stats: Callable[[nn.Module], torch.Tensor],
    config: LoraConfig | None = None,
) -> nn.Module:
    """PEFT LoRA wrap, then `method.init(W, pop_stats(base_layer), spec)` on every adapter layer.

    `pop_stats` takes the layer's statistics off its base `nn.Linear` (where PEFT's preprocessing
    attached them before wrapping) so each is freed right after its layer is initialised.
    """
    peft_model = get_peft_model(model, config or lora_config(method, ctx))
    layers = lora_layers(peft_model)
    per_layer = ((name, pop_stats(layer.get_base_layer())) for name, layer in layers.items())
    init_each(layers, per_layer, method, ctx.cfg.method, report)
    return peft_model


def timed_build(build: Callable[[BuildReport], nn.Module]) -> tuple[nn.Module, BuildReport]:
    """Run `build(report)` and record its wall time as the init time."""
    report = BuildReport()
    with Timer() as timer:
        model = build(report)
    report.init_seconds = timer.seconds
    return model, report
