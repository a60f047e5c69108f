"""PEFT's per-layer initialisers as pure functions of one weight matrix.

PEFT implements most baselines as code that runs inside `LoraLayer.update_layer` on a wrapped layer.
`peft_layer_init` runs exactly that code on a fresh, throwaway `nn.Linear` holding a copy of `W` and reads
out (A, B, residual), which turns PEFT's initialisers into pure per-layer functions
`init(weight, stats, spec) -> LoraInit` (testable on one matrix, written by `astra.build.apply_init`).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from astra.methods import LoraInit

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
    weight: torch.Tensor, spec: Any, inputs: dict[str, Any] | None = None, **lora_kwargs: Any
) -> LoraInit:
    """Run PEFT's initialiser (`LoraConfig(**lora_kwargs)`) on a single throwaway linear holding `weight`.

    `inputs`: what PEFT's initialiser reads off its base layer (CorDA: `eigens`; LoRA-GA with
    `formula=peft`: `_peft_loraga_grad`), set on the throwaway layer only, never on the model. Returns
    A (r, d_in), B (d_out, r) and the residual (d_out, d_in) PEFT leaves in the base layer, so that
    `W = residual + s * B @ A` up to rounding.
    """
    base = one_linear(weight.detach())
    for key, value in (inputs or {}).items():
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


def without_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}
