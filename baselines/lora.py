"""LoRA (Hu et al., 2021, arXiv 2106.09685) through PEFT: B = 0 and A random, so `W + s B A = W` at init.

`init=kaiming`: A ~ Kaiming-uniform(a=sqrt(5)) as `nn.Linear` (the authors' loralib and PEFT's default);
`init=gaussian`: A ~ N(0, 1/r^2) (PEFT's `init_lora_weights="gaussian"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from astra.config import MethodConfig
from astra.methods import InitMethod, register

INITS = {"kaiming": True, "gaussian": "gaussian"}  # our name -> PEFT's `init_lora_weights`


@dataclass
class LoRAConfig(MethodConfig):
    init: str = "kaiming"  # kaiming | gaussian (distribution of A; B = 0 either way)


def init_lora_weights(cfg: Any) -> bool | str:
    if cfg.init not in INITS:
        raise ValueError(f"method.init={cfg.init!r} for {cfg.name}; valid: {', '.join(INITS)}")
    return INITS[cfg.init]


@register
class LoRA(InitMethod):
    name = "lora"
    schema = LoRAConfig

    def peft_kwargs(self, cfg: Any) -> dict[str, Any]:
        return {"init_lora_weights": init_lora_weights(cfg)}
