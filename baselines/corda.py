"""CorDA (Yang et al., 2024, arXiv 2406.05223): context-oriented decomposition, through PEFT.

Statistics (`astra.stats`, the machinery and samples Astra uses; `needs = "input_cov"`): per target
layer the input second moment `C = (1/N) sum_i X_i^T X_i` over the N calibration samples, each sample's
real-token activations `X_i` (tokens, d_in) divided by `|max(X_i)|`: the options below reproduce the
release's hook (ported by PEFT's `calib_cov_distribution`, one unpadded sample per forward); a test pins
the two equal.

Init (PEFT's `collect_eigens_for_layer` + `corda_init`): damp `C <- C + lambda * mean(diag C) I`
(lambda = 0.01, doubled until C is numerically invertible), take the SVD `W C = U S V^T`, and keep r triplets:
IPM (instruction-previewed, adapt the largest: knowledge learned) or KPM (knowledge-preserved, adapt the
smallest: the adapter holds the directions the calibration data uses least). Then
`A = sqrt(S_r / s) V_r^T C^{-1}`, `B = U_r sqrt(S_r / s)`, so `s B A = U_r S_r V_r^T C^{-1}`, and the frozen
residual `W - s B A` (summing every triplet gives `W C C^{-1} = W`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import CordaEigens, collect_eigens_for_layer

from astra.config import MethodConfig, not_in_signature
from astra.methods import InitMethod, LoraInit, register
from astra.stats import AccumDtype, Accumulate, Engine, Normalizer, Offload, SampleNorm
from baselines.common import one_linear, peft_layer_init


class CordaMethod(StrEnum):
    ipm = "ipm"  # instruction-previewed: adapt the largest triplets
    kpm = "kpm"  # knowledge-preserved: adapt the smallest


@dataclass
class CorDAMethodConfig(MethodConfig):
    corda_method: CordaMethod = CordaMethod.ipm
    # statistic options read by astra.stats (defaults = CorDA's release: uncentred, per-sample max scaling)
    centered: bool = False
    sample_norm: SampleNorm = SampleNorm.max_abs  # each sample's X divided by |max(X)|
    mask_padding: bool = True  # the release runs one unpadded sample per forward: no padding to count
    normalizer: Normalizer = Normalizer.forwards  # divide by the number of calibration samples
    accum_dtype: AccumDtype = AccumDtype.fp32
    stats_engine: Engine = not_in_signature(Engine.sequential)  # exact either way (astra.stats)
    stats_offload: Offload = not_in_signature(Offload.none)  # cached hidden states: none | cpu | disk (exact)
    accumulate: Accumulate = not_in_signature(Accumulate.auto)


def corda_eigens(weight: torch.Tensor, cov: torch.Tensor, rank: int, method: str) -> CordaEigens:
    """PEFT's SVD of `W C` for one layer, cropped to the r kept triplets: U (d_out, r), S (r,), V (d_in, r)."""
    base = one_linear(weight.detach())
    base.covariance_matrix = cov.to(weight.device)  # (d_in, d_in)
    full = collect_eigens_for_layer(base, None)  # the config argument is unused by PEFT here
    keep = slice(0, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(
        S_WC=full.S_WC[keep].clone(), U_WC=full.U_WC[:, keep].clone(), V_WC=full.V_WC[:, keep].clone()
    )


@register
class CorDA(InitMethod):
    name = "corda"
    needs = "input_cov"
    schema = CorDAMethodConfig

    def init(self, weight: torch.Tensor, stats: Any, spec: Any) -> LoraInit:
        """A (r, d_in), B (d_out, r) from the SVD of `W C`, C = the input covariance (`stats.matrix` or a
        tensor, (d_in, d_in)); residual W - s B A."""
        stats = stats.matrix if hasattr(stats, "matrix") else stats
        if stats is None:
            raise ValueError(
                f"corda: layer {spec.name} has no input covariance (it saw no calibration forward)"
            )
        method = str(spec.method.corda_method)
        eigens = corda_eigens(weight, stats, spec.rank, method)
        init = peft_layer_init(weight, spec, inputs={"eigens": eigens}, init_lora_weights="corda",
                               corda_config=CordaConfig(corda_method=method))  # fmt: skip
        init.info = {"sv_max": float(eigens.S_WC.max()), "sv_min": float(eigens.S_WC.min())}
        return init
