"""OLoRA (Büyükakyüz, 2024, arXiv 2406.01775) through PEFT's `olora_init`, run per layer.

With the QR decomposition `W = Q R`: `B = Q[:, :r]` (orthonormal columns), `A = R[:r]`, and the frozen
residual `W - s B A`. Since `Q_r R_r = Q_r Q_r^T W`, the adapter holds the projection of W onto the span
of its first r columns, scaled by s (the residual keeps `W - s Q_r Q_r^T W`).
"""

from __future__ import annotations

from typing import Any

import torch

from astra.config import MethodConfig
from astra.methods import InitMethod, LoraInit, register
from baselines.common import peft_layer_init


@register
class OLoRA(InitMethod):
    name = "olora"
    schema = MethodConfig

    def init(self, weight: torch.Tensor, stats: torch.Tensor | None, spec: Any) -> LoraInit:
        """A = R[:r] (r, d_in), B = Q[:, :r] (d_out, r), residual W - s B A (d_out, d_in)."""
        return peft_layer_init(weight, spec, init_lora_weights="olora")
