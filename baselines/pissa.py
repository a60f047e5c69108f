"""PiSSA (Meng et al., 2024, arXiv 2404.02948) through PEFT's `pissa_init`, run per layer.

With `W = U S V^T`: `A = sqrt(S_r / s) V_r^T`, `B = U_r sqrt(S_r / s)` from the r largest singular
triplets, and the frozen residual `W - s B A = U_[r:] S_[r:] V_[r:]^T` (the principal part trains).
`niter=0` is the exact SVD (`init_lora_weights="pissa"`); `niter=K` is PEFT's fast randomised SVD
(`"pissa_niter_K"`, `torch.svd_lowrank` with K subspace iterations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from astra.config import MethodConfig
from astra.methods import InitMethod, LoraInit, register
from baselines.common import peft_layer_init


@dataclass
class PiSSAConfig(MethodConfig):
    niter: int = 0  # 0: full SVD; K > 0: PEFT's fast SVD with K subspace iterations (paper: niter=4 ~ full)


def peft_init_name(niter: int) -> str:
    if niter < 0:
        raise ValueError(f"method.niter={niter} for pissa; valid: 0 (full SVD) or a positive iteration count")
    return "pissa" if niter == 0 else f"pissa_niter_{niter}"


@register
class PiSSA(InitMethod):
    name = "pissa"
    schema = PiSSAConfig

    def init(self, weight: torch.Tensor, stats: torch.Tensor | None, spec: Any) -> LoraInit:
        """A (r, d_in), B (d_out, r) from W's top-r singular triplets; residual (d_out, d_in)."""
        init = peft_layer_init(weight, spec, init_lora_weights=peft_init_name(spec.method.niter))
        init.info = {"principal_sv_sum": float((init.B.float().norm(dim=0) ** 2).sum() * spec.scaling)}
        return init
