"""LoRA (Hu et al., 2021, arXiv 2106.09685) and its DoRA preset, through PEFT.

LoRA: B = 0 and A random, so `W + s B A = W` at init. `init=kaiming`: A ~ Kaiming-uniform(a=sqrt(5)) as
`nn.Linear` (the authors' loralib and PEFT's default); `init=gaussian`: A ~ N(0, 1/r^2) (PEFT's
`init_lora_weights="gaussian"`).

DoRA (Liu et al., 2024, arXiv 2402.09353) is a preset: `conf/method/dora.yaml` fills this schema with
`use_dora: true` (`astra.methods.register_presets`). PEFT splits the weight into magnitude and
direction, `W' = m * (W + s B A) / ||W + s B A||_c` (column norm over the input axis, one entry per output feature),
with `m = ||W||_c` and B = 0 at init, so the function is preserved. DoRA trains `d_out` magnitude entries
per adapted layer on top of LoRA's `r * (d_in + d_out)`. Its training forward is `DoraForward` (same
function, parameters, state dict and merge as PEFT's; fewer passes over the activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from astra.config import MethodConfig
from astra.methods import InitMethod, register


class LoraAInit(StrEnum):
    """Distribution of A (B = 0 either way)."""

    kaiming = "kaiming"
    gaussian = "gaussian"


PEFT_INIT = {LoraAInit.kaiming: True, LoraAInit.gaussian: "gaussian"}  # ours -> PEFT's `init_lora_weights`


@dataclass
class LoRAConfig(MethodConfig):
    init: LoraAInit = LoraAInit.kaiming
    use_dora: bool = False  # the `dora` preset


@register
class LoRA(InitMethod):
    name = "lora"
    schema = LoRAConfig

    def peft_kwargs(self, cfg: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"init_lora_weights": PEFT_INIT[LoraAInit(cfg.init)]}
        if cfg.use_dora:
            kwargs["use_dora"] = True
        return kwargs

    def wrapped(self, peft_model: nn.Module, cfg: Any) -> None:
        if cfg.use_dora:
            use_dora_forward(peft_model)


class DoraForward(DoraLinearVariant):
    """PEFT's DoRA variant of `nn.Linear` with a leaner forward; everything else (init, merge) is PEFT's.

    PEFT returns `y + (m/n - 1) (y - b) + (m/n) s B A x`, `y = W x + b` the base output, with the row norm
    `n = ||W + s B A||` (detached, DoRA Sec. 4.3) of a d_out x d_in matrix built by sending an identity
    matrix through A and B: five elementwise passes over the output, each with its backward, where LoRA's
    `y + s B A x` makes two. The same function here is `m/n (y - b) + (s m/n B) A x + b`: the factor
    `s m/n` goes into B's (d_out, r) weight, the bias into that product's GEMM, so one pass remains
    without a bias (`addcmul`), and `n^2 = ||W||^2 + 2 s <W A^T, B> + s^2 <B A A^T, B>` row by row never
    forms a d_out x d_in matrix. Dropout during training (PEFT then reruns the base layer on the dropped
    input), `fan_in_fan_out` weights, a LoRA bias and several active adapters keep PEFT's forward.
    """

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any):
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropped = module.training and not isinstance(module.lora_dropout[active_adapter], nn.Identity)
        if dropped or module.fan_in_fan_out or lora_B.bias is not None or len(module.active_adapters) > 1:
            return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        scaling, base = module.scaling[active_adapter], module.get_base_layer()
        norm = row_norm(base.weight.to(x.dtype), lora_B.weight, lora_A.weight, scaling)
        scale = module.lora_magnitude_vector[active_adapter].weight / norm  # m / n
        bias = None if base.bias is None else base.bias.to(x.dtype)
        lora = F.linear(lora_A(x), lora_B.weight * (scaling * scale)[:, None], bias)
        return torch.addcmul(lora, result if bias is None else result - bias, scale)


@torch.no_grad()
def row_norm(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| of every row, from (d_out, r) products only."""
    M = torch.addmm(B @ (A @ A.T), W, A.T, beta=scaling**2, alpha=2 * scaling)  # 2s W A^T + s^2 B A A^T
    return (torch.linalg.vector_norm(W, dim=1).square() + torch.linalg.vecdot(B, M)).sqrt()


def use_dora_forward(peft_model: nn.Module) -> None:
    """Give every DoRA-adapted `nn.Linear` of `peft_model` the `DoraForward` variant (quantized layers,
    PEFT classes of their own, keep PEFT's)."""
    for module in peft_model.modules():
        if type(module) is LoraLinear:
            for adapter, variant in module.lora_variant.items():
                if type(variant) is DoraLinearVariant:
                    module.lora_variant[adapter] = DoraForward()
