"""LoRA (Hu et al., 2021, arXiv 2106.09685) and its DoRA preset, through PEFT.

LoRA: B = 0 and A random, so `W + s B A = W` at init. `init=kaiming`: A ~ Kaiming-uniform(a=sqrt(5)) as
`nn.Linear` (the authors' loralib and PEFT's default); `init=gaussian`: A ~ N(0, 1/r^2) (PEFT's
`init_lora_weights="gaussian"`).

DoRA (Liu et al., 2024, arXiv 2402.09353) is a preset: `conf/method/dora.yaml` fills this schema with
`use_dora: true` (no code; `astra.methods.register_presets`). PEFT splits the weight into magnitude and
direction, `W' = m * (W + s B A) / ||W + s B A||_c` (column norm over the input axis, one entry per output feature),
with `m = ||W||_c` and B = 0 at init, so the function is preserved. DoRA trains `d_out` magnitude entries
per adapted layer on top of LoRA's `r * (d_in + d_out)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

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
