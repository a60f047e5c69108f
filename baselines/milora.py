"""MiLoRA (Wang et al., 2024, arXiv 2406.09044): adapt the *minor* singular components. Ours (not in PEFT).

With `W = U S V^T` (singular values descending) and the r smallest triplets `U_m, S_m, V_m`:
`A = sqrt(S_m / s) V_m^T`, `B = U_m sqrt(S_m / s)` (scaled by the LoRA scaling s as PEFT's PiSSA does, so
`s B A = U_m S_m V_m^T`), and the frozen residual `W - s B A = U_[:-r] S_[:-r] V_[:-r]^T`, the principal part.
"""

from __future__ import annotations

from typing import Any

import torch

from astra.config import MethodConfig
from astra.methods import InitMethod, LoraInit, register
from baselines.common import residual_init


def minor_factors(
    weight: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r), S_m (r,)) from the r smallest singular triplets of `weight` (fp32)."""
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"MiLoRA rank {rank} must be in [1, min{tuple(weight.shape)}]")
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)  # U (d_out, k), S (k,), Vh (k, d_in)
    U_m, S_m, Vh_m = U[:, -rank:], S[-rank:], Vh[-rank:]
    root = (S_m / scaling).sqrt()  # (r,)
    return root[:, None] * Vh_m, U_m * root[None, :], S_m


@register
class MiLoRA(InitMethod):
    name = "milora"
    schema = MethodConfig

    def init(self, weight: torch.Tensor, stats: torch.Tensor | None, spec: Any) -> LoraInit:
        """A (r, d_in), B (d_out, r) from W's bottom-r singular triplets; residual (d_out, d_in)."""
        A, B, S_m = minor_factors(weight, spec.rank, spec.scaling)
        init = residual_init(weight, A, B, spec.scaling)
        init.info = {"minor_sv_max": float(S_m.max()), "minor_sv_min": float(S_m.min())}
        return init
