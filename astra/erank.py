"""Effective rank: the two definitions the project uses, each under its own name, and the grouping of
per-layer values by module type. Pure maths over tensors; no model, trainer or pipeline imports.

- `effective_rank` / `spectrum_effective_rank` / `covariance_effective_rank`: Roy and Vetterli (2007),
  `erank(M) = exp(H(p))`, `p_i = sigma_i / sum_j sigma_j`, `H(p) = -sum_i p_i log p_i` over the singular
  values `sigma` of `M` (eigenvalues for a covariance), in float64 with numerical zeros dropped. A flat
  spectrum of size n gives n, a rank-1 matrix 1, the zero matrix (LoRA's update at step 0) 0. Used by
  the rank probes (`astra/probes.py`) and read back by `analysis`.
- `release_effective_rank`: the authors' release (`stable_effective_rank_fn`): float32, eigenvalues
  clamped to >= eps and `log(p + eps)`; what their rank allocation scores layers with. It differs from
  Roy-Vetterli on rank-deficient spectra (a zero eigenvalue counts as eps, not as absent), so the two
  must never be mixed under one name.

torch is imported inside the functions that need it: `analysis` imports this module for the
module-type grouping of stored values (`by_module_type`) without loading torch.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Module type of a linear layer from its qualified name: LLaMA-style names first, then BERT-style.
# BERT's `attention.output.dense` is the attention output projection (o); `intermediate.dense` the
# MLP up projection; the block's final `output.dense` the MLP down projection. Order matters:
# the first pattern that matches wins (`attention.output.dense` also ends in `output.dense`).
MODULE_TYPES: tuple[tuple[str, str], ...] = (
    ("q", r"(^|\.)(q_proj|query_proj|query|q)$"),
    ("k", r"(^|\.)(k_proj|key_proj|key|k)$"),
    ("v", r"(^|\.)(v_proj|value_proj|value|v)$"),
    ("o", r"(^|\.)(o_proj|out_proj|attention\.output\.dense)$"),
    ("gate", r"(^|\.)(gate_proj|w1)$"),
    ("up", r"(^|\.)(up_proj|intermediate\.dense|fc1|w3)$"),
    ("down", r"(^|\.)(down_proj|output\.dense|fc2|w2)$"),
)
MODULE_ORDER = tuple(t for t, _ in MODULE_TYPES)


def spectrum_effective_rank(spectrum: torch.Tensor, rtol: float = 1e-12, atol: float = 0.0) -> float:
    """Roy-Vetterli exp(entropy) of the L1-normalised non-negative `spectrum` (k,); 0.0 when it is all zero.

    Values at or below `max(rtol * max, atol)` are numerical zeros of a rank-deficient matrix and are
    dropped (`rtol`: the tolerance `numpy.linalg.matrix_rank` uses; `atol`: a known round-off floor),
    so a rank-1 matrix gives 1, not 1 + O(round-off).
    """
    import torch

    s = spectrum.detach().double().flatten().abs()
    if s.numel() == 0 or s.max() <= atol:
        return 0.0
    s = s[s > max(rtol * s.max(), atol)]
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _rtol(matrix: torch.Tensor) -> float:
    """matrix_rank's tolerance: max(m, n) * machine epsilon of the dtype the matrix was computed in."""
    import torch

    dtype = matrix.dtype if matrix.dtype.is_floating_point else torch.float64
    return max(matrix.shape) * torch.finfo(dtype).eps


def effective_rank(matrix: torch.Tensor, atol: float = 0.0) -> float:
    """Roy-Vetterli effective rank of a (m, n) matrix from its singular values (float64, on the CPU)."""
    import torch

    if matrix.ndim != 2:
        raise ValueError(f"effective_rank expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    return spectrum_effective_rank(torch.linalg.svdvals(matrix.detach().double().cpu()), _rtol(matrix), atol)


def covariance_effective_rank(cov: torch.Tensor) -> float:
    """Roy-Vetterli effective rank of a symmetric PSD (d, d) covariance from its eigenvalues
    (negative eigenvalues are round-off and count as zero)."""
    import torch

    eig = torch.linalg.eigvalsh(cov.detach().double().cpu())
    return spectrum_effective_rank(eig.clamp(min=0), _rtol(cov))


def release_effective_rank(eigenvalues: torch.Tensor, eps: float = 1e-8) -> float:
    """The authors' `stable_effective_rank_fn` on a spectrum (k,): float32, values clamped to >= eps,
    exp(-sum p log(p + eps)). Kept bit-for-bit for the release's rank allocation; not Roy-Vetterli
    (a zero eigenvalue contributes eps instead of being dropped)."""
    import torch

    s = eigenvalues.detach().to(torch.float32).clamp(min=eps)
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p + eps)).sum()))


def storage_noise_floor(weight: torch.Tensor) -> float:
    """Spectral norm of the round-off of storing `weight` (m, n) in its dtype: eps * rms(W) * (sqrt m + sqrt n).

    A difference of two stored weights, W_t - W_0, carries an elementwise rounding error of at most
    eps/2 * |w|; a random (m, n) matrix of such entries has spectral norm about that bound (twice
    the margin). Singular values of dW below it are rounding noise, not learned directions.
    """
    import torch

    eps = torch.finfo(weight.dtype).eps
    rms = weight.detach().double().pow(2).mean().sqrt().item()
    return eps * rms * (weight.shape[0] ** 0.5 + weight.shape[1] ** 0.5)


def lowrank_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values (k,) of `left @ right.T` for `left` (m, k), `right` (n, k), k << m, n, without the product.

    With `left = Q_l R_l`, `right = Q_r R_r` (thin QR), `left @ right.T = Q_l (R_l R_r^T) Q_r^T` and the
    orthonormal factors keep singular values, so only the (k, k) core needs an SVD: O((m + n) k^2)
    instead of O(m n min(m, n)) -- what makes probing a 7B model's LoRA updates cheap.
    """
    import torch

    if left.shape[1] != right.shape[1]:
        raise ValueError(f"inner dimensions differ: left {tuple(left.shape)}, right {tuple(right.shape)}")
    r_left = torch.linalg.qr(left.detach().double().cpu(), mode="r").R  # (k, k) when m >= k
    r_right = torch.linalg.qr(right.detach().double().cpu(), mode="r").R
    return torch.linalg.svdvals(r_left @ r_right.T)


def module_type(name: str) -> str:
    """q | k | v | o | gate | up | down for a linear layer's qualified name; `other` when none matches."""
    for kind, pattern in MODULE_TYPES:
        if re.search(pattern, name):
            return kind
    return "other"


def by_module_type(per_layer: Mapping[str, float]) -> dict[str, float]:
    """Mean of per-layer values for each module type, in q/k/v/o/gate/up/down(/other) order."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, value in per_layer.items():
        groups[module_type(name)].append(float(value))
    return {kind: sum(groups[kind]) / len(groups[kind]) for kind in (*MODULE_ORDER, "other") if groups[kind]}
