"""LoRA-GA (Wang et al., 2024, arXiv 2407.05000): adapters from the SVD of the full-weight gradient.

Statistics: `G = dL/dW` (d_out, d_in) averaged over the first `grad_batches` calibration batches (the
same samples as Astra), estimated by PEFT's `preprocess_loraga` with the model in eval mode (no dropout:
the estimate is deterministic). With `G = U S V^T`, direction `ArB2r` (paper/release default) takes
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
from typing import Any

import torch
from peft.tuners.lora import LoraGAConfig, preprocess_loraga
from torch import nn

from astra.adapters import lora_config
from astra.config import MethodConfig
from astra.methods import BuildContext, BuildReport, InitMethod, LoraInit, register
from astra.models import model_device
from baselines.common import (
    calibration,
    peft_layer_init,
    residual_init,
    timed_build,
    to_device,
    wrap_and_init,
)

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "unit", "gd", "weight_svd")
FORMULAS = ("paper", "peft")
PEFT_SCALE = {"stable": "stable", "unit": "unit", "gd": "gd_scale", "weight_svd": "weight_svd"}
GRAD_ATTR = "_peft_loraga_grad"  # where PEFT's preprocess_loraga leaves the averaged gradient


@dataclass
class LoraGAMethodConfig(MethodConfig):
    direction: str = "ArB2r"  # ArB2r | A2rBr | ArBr | random (paper & release default: ArB2r)
    scale: str = "stable"  # stable | unit | gd | weight_svd
    stable_gamma: float = 16.0  # gamma of the stable scale (release default 16)
    grad_batches: int | None = (
        None  # calibration batches averaged for G; None = all (calib.n / calib.batch_size)
    )
    formula: str = "paper"  # paper (authors' formula) | peft (PEFT 0.21's lora_ga_init)
    svd_niter: int = (
        0  # 0: exact SVD; K > 0: torch.svd_lowrank(q=min(4r, .), niter=K) as the release (niter=4)
    )


def validate(cfg: Any) -> None:
    for key, valid in (("direction", DIRECTIONS), ("scale", SCALES), ("formula", FORMULAS)):
        value = getattr(cfg, key)
        if value not in valid:
            raise ValueError(f"method.{key}={value!r} for lora_ga; valid: {', '.join(valid)}")
    if cfg.grad_batches is not None and cfg.grad_batches < 1:
        raise ValueError(f"method.grad_batches={cfg.grad_batches} for lora_ga must be >= 1 or null (all)")


def gradient_svd(
    grad: torch.Tensor, rank: int, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (d_out, k), S (k,), Vh (k, d_in)) of the gradient in fp32, k >= 2r singular triplets."""
    if 2 * rank > min(grad.shape):
        raise ValueError(f"LoRA-GA needs 2r <= min{tuple(grad.shape)} singular vectors; rank is {rank}")
    grad = grad.float()
    if niter == 0:
        return torch.linalg.svd(grad, full_matrices=False)
    U, S, V = torch.svd_lowrank(grad, q=min(4 * rank, min(grad.shape)), niter=niter)
    return U, S, V.T


def direction_slices(direction: str, rank: int) -> tuple[Any, Any]:
    """(indices of A's rows in Vh, indices of B's columns in U) among the first 2r singular vectors."""
    if direction == "ArB2r":
        return slice(0, rank), slice(rank, 2 * rank)
    if direction == "A2rBr":
        return slice(rank, 2 * rank), slice(0, rank)
    if direction == "ArBr":
        return slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    perm = torch.randperm(2 * rank).tolist()  # release: a random split of the first 2r (seeded by the run)
    return perm[:rank], perm[rank:]


def paper_factors(weight: torch.Tensor, grad: torch.Tensor, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) by the paper's formula and the authors' release."""
    cfg, r, s = spec.method, spec.rank, spec.scaling
    U, _, Vh = gradient_svd(grad, r, cfg.svd_niter)
    a_idx, b_idx = direction_slices(cfg.direction, r)
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

    def init(self, weight: torch.Tensor, stats: torch.Tensor | None, spec: Any) -> LoraInit:
        """A (r, d_in), B (d_out, r) from the gradient `stats` (d_out, d_in); residual W - s B A."""
        if stats is None:
            raise ValueError(f"lora_ga: layer {spec.name} has no gradient (it did not take part in the loss)")
        cfg = spec.method
        validate(cfg)
        if cfg.formula == "peft":
            ga = LoraGAConfig(
                direction=cfg.direction, scale=PEFT_SCALE[cfg.scale], stable_gamma=cfg.stable_gamma
            )
            init = peft_layer_init(weight, spec, attach={GRAD_ATTR: stats}, init_lora_weights="lora_ga",
                                   lora_ga_config=ga)  # fmt: skip
        else:
            A, B = paper_factors(weight, stats, spec)
            init = residual_init(weight, A, B, spec.scaling)
        init.info = {"grad_norm": float(stats.float().norm())}
        return init

    def build(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, BuildReport]:
        validate(ctx.cfg.method)

        def build(report: BuildReport) -> nn.Module:
            config = lora_config(self, ctx)
            n = estimate_gradients(model, config, calibration(ctx, self.name, ctx.cfg.method.grad_batches))
            report.extra["grad_batches"] = n
            return wrap_and_init(self, model, ctx, report, pop_gradient, config)

        return timed_build(build)


def estimate_gradients(model: nn.Module, config: Any, batches: list[dict[str, torch.Tensor]]) -> int:
    """Attach the batch-averaged loss gradient of every target weight (PEFT's `preprocess_loraga`).

    Returns the number of batches. Runs in eval mode (no dropout); the model's mode is restored.
    """
    if any("labels" not in b for b in batches):
        raise ValueError("lora_ga needs labelled calibration batches (a loss to differentiate)")
    was_training, device = model.training, model_device(model)

    def train_step() -> None:
        model.eval()  # PEFT switches to train mode; a deterministic gradient wants dropout off
        for batch in batches:
            model(**to_device(batch, device)).loss.backward()

    config.lora_ga_config = LoraGAConfig()  # required by preprocess_loraga; the init itself is ours
    try:
        preprocess_loraga(model, config, train_step)
    finally:
        config.lora_ga_config = None
        model.train(was_training)
    return len(batches)


def pop_gradient(base: nn.Module) -> torch.Tensor | None:
    grad = getattr(base, GRAD_ATTR, None)
    if grad is not None:
        delattr(base, GRAD_ATTR)
    return grad
