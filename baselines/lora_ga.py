"""LoRA-GA (Wang et al., 2024, arXiv 2407.05000): adapters from the SVD of the full-weight gradient.

Statistics (`needs = "grad"`, `astra.stats.collect_statistics`): `G = dL/dW` (d_out, d_in) averaged over
the first `grad_batches` calibration batches (the same samples as Astra), as PEFT's `preprocess_loraga`
estimates it, with the model in eval mode (no dropout: deterministic) and bounded memory (one fp32 sum
per target, micro-batched backward passes); returned as values, never stored on the model's layers. With `G = U S V^T`, direction `ArB2r` (paper/release default) takes
`A = V[:, :r]^T`, `B = U[:, r:2r]`; `A2rBr`: `A = V[:, r:2r]^T`, `B = U[:, :r]`; `ArBr`: A the odd, B the even
indices of the first 2r; `random`: a random split of the first 2r. The frozen residual is `W - s B A`.

Two formulas, both pinned by tests:
- `formula=paper` (default): the paper's Eq. for the `stable` scale and the authors' release
  (Outsider565/LoRA-GA): both factors times `d_out^(1/4) / sqrt(gamma)`, no singular values. Other scales:
  `unit` (none), `gd` (both / s), `weight_svd` (both times mean(sqrt(S_W[:r] / s)), the release's `weightS`).
- `formula=peft`: PEFT 0.21's `lora_ga_init`, which differs: `B = U[:, slice] diag(S[slice])` and the
  `stable` factor applied to B only; `weight_svd` rescales B so its largest value matches `S_W[0]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from peft.tuners.lora import LoraGAConfig

from astra.config import MethodConfig, not_in_signature
from astra.methods import InitMethod, LoraInit, register
from baselines.common import peft_layer_init, residual_init


class Direction(StrEnum):
    """Which singular vectors of G give A and B (the paper's names, kept verbatim)."""

    ArB2r = "ArB2r"
    A2rBr = "A2rBr"
    ArBr = "ArBr"
    random = "random"


class Scale(StrEnum):
    stable = "stable"
    unit = "unit"
    gd = "gd"
    weight_svd = "weight_svd"


class Formula(StrEnum):
    paper = "paper"
    peft = "peft"


PEFT_SCALE = {"stable": "stable", "unit": "unit", "gd": "gd_scale", "weight_svd": "weight_svd"}
PEFT_GRAD = "_peft_loraga_grad"  # what PEFT's lora_ga_init reads off its (throwaway) base layer


@dataclass
class LoraGAMethodConfig(MethodConfig):
    direction: Direction = Direction.ArB2r  # paper & release default
    scale: Scale = Scale.stable
    stable_gamma: float = 16.0  # gamma of the stable scale (release default 16)
    grad_batches: int | None = None  # calibration batches averaged for G; None = all
    formula: Formula = Formula.paper  # paper (authors' formula) | peft (PEFT 0.21's lora_ga_init)
    svd_niter: int = (
        0  # 0: exact SVD; K > 0: torch.svd_lowrank(q=min(4r, .), niter=K) as the release (niter=4)
    )
    grad_micro_batch: int | None = not_in_signature(None)  # samples per backward (memory only; exact)


def gradient_svd(
    grad: torch.Tensor, rank: int, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (d_out, k), S (k,), Vh (k, d_in)) of the gradient in fp32, k = min(2r, d_out, d_in) or more."""
    if rank > min(grad.shape):
        raise ValueError(
            f"LoRA-GA rank {rank} exceeds min{tuple(grad.shape)}, the number of singular vectors"
        )
    grad = grad.float()
    if niter == 0:
        return torch.linalg.svd(grad, full_matrices=False)
    U, S, V = torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=niter)
    return U, S, V.T


def direction_slices(direction: str, rank: int, k: int) -> tuple[Any, Any]:
    """(indices of A's rows in Vh, indices of B's columns in U) among the first 2r of k singular vectors.

    Ours, where the paper is silent: when 2r > k = min(d_out, d_in) (r = 128 on SmolLM2's 192-row k/v
    projections) only k singular vectors exist, and ArB2r / A2rBr take the second slice as the last r of
    them (overlapping the first by 2r - k, reported per layer as `slice_overlap`); ArBr and random need 2r.
    """
    second = slice(rank, 2 * rank) if 2 * rank <= k else slice(k - rank, k)
    if direction == "ArB2r":
        return slice(0, rank), second
    if direction == "A2rBr":
        return second, slice(0, rank)
    if 2 * rank > k:
        raise ValueError(f"LoRA-GA direction={direction} needs 2r = {2 * rank} <= {k} singular vectors; "
                         "use direction ArB2r or A2rBr (they shift the second slice) or a smaller rank")  # fmt: skip
    if direction == "ArBr":
        return slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    perm = torch.randperm(2 * rank).tolist()  # release: a random split of the first 2r (seeded by the run)
    return perm[:rank], perm[rank:]


def paper_factors(weight: torch.Tensor, grad: torch.Tensor, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) by the paper's formula and the authors' release."""
    cfg, r, s = spec.method, spec.rank, spec.scaling
    U, _, Vh = gradient_svd(grad, r, cfg.svd_niter)
    a_idx, b_idx = direction_slices(cfg.direction, r, min(grad.shape))
    A, B = Vh[a_idx], U[:, b_idx]
    if cfg.scale == "stable":
        factor = (
            weight.shape[0] ** 0.25 / cfg.stable_gamma**0.5
        )  # d_out^(1/4) / sqrt(gamma): the paper's stable scale
    elif cfg.scale == "gd":
        factor = 1.0 / s
    elif cfg.scale == "weight_svd":
        S_w = torch.linalg.svdvals(weight.float())[:r] / s
        factor = float(S_w.sqrt().mean())
    else:
        factor = 1.0
    return A * factor, B * factor


@register
class LoraGA(InitMethod):
    name = "lora_ga"
    needs = "grad"
    schema = LoraGAMethodConfig

    def check(self, cfg: Any) -> None:
        if cfg.grad_batches is not None and cfg.grad_batches < 1:
            raise ValueError(f"method.grad_batches={cfg.grad_batches} for lora_ga must be >= 1 or null (all)")

    def calibration_limit(self, cfg: Any) -> int | None:
        return cfg.grad_batches

    def init(self, weight: torch.Tensor, stats: Any, spec: Any) -> LoraInit:
        """A (r, d_in), B (d_out, r) from the gradient (`stats.matrix` or a tensor, (d_out, d_in)); residual W - s B A."""
        grad = stats.matrix if hasattr(stats, "matrix") else stats
        if grad is None:
            raise ValueError(f"lora_ga: layer {spec.name} has no gradient (it did not take part in the loss)")
        cfg = spec.method
        if cfg.formula == "peft":
            ga = LoraGAConfig(
                direction=str(cfg.direction), scale=PEFT_SCALE[cfg.scale], stable_gamma=cfg.stable_gamma
            )
            init = peft_layer_init(weight, spec, inputs={PEFT_GRAD: grad}, init_lora_weights="lora_ga",
                                   lora_ga_config=ga)  # fmt: skip
        else:
            A, B = paper_factors(weight, grad, spec)
            init = residual_init(weight, A, B, spec.scaling)
        init.info = {
            "grad_norm": float(grad.float().norm()),
            "slice_overlap": max(0, 2 * spec.rank - min(grad.shape)),
        }
        return init
