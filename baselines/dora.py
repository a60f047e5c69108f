"""DoRA (Liu et al., 2024, arXiv 2402.09353) through PEFT's `use_dora=True`.

The weight is split into magnitude and direction, `W' = m * (W + s B A) / ||W + s B A||_c` (column norm
over the input axis, one entry per output feature). PEFT initialises `m = ||W||_c` and LoRA's B = 0, so the
function is preserved at init. DoRA trains `d_out` magnitude entries per adapted layer on top of LoRA's
`r * (d_in + d_out)`: at equal rank it has slightly more trainable parameters than the other adapters.
"""

from __future__ import annotations

from typing import Any

from astra.methods import register
from baselines.lora import LoRA, LoRAConfig


@register
class DoRA(LoRA):
    name = "dora"
    schema = LoRAConfig

    def peft_kwargs(self, cfg: Any) -> dict[str, Any]:
        return {**super().peft_kwargs(cfg), "use_dora": True}
