"""Spectral maths of layer statistics (pure functions; the Astra method imports these).

`decompose(stats, eig_dtype)` returns all eigenpairs of a layer's statistic (ascending). For an
output covariance formed from the shared input moment (`LayerStats.input_moment` P, (d_in+1)^2) with
d_out > d_in + 1, `C = W_aug P W_aug^T` has rank <= d_in + 1; its range is computed from the
(d_in+1)-sized problem, exactly:

    P = L L^T (eigh, negative round-off clipped),  F = W_aug L,  F^T F = Q diag(S^2) Q^T  =>  C = U S^2 U^T

with U = F Q / S (both small eigenproblems in fp64, (d_in+1)^3 each), so the range eigenpairs are
(S^2, U) and the other d_out - k eigenvalues are 0 with eigenvectors any orthonormal basis of
range(F)^perp; we take the deterministic complete-QR complement of U. That
complement is the null space of W_aug^T (when P is non-singular): a tail selection there gives
V^T W = 0, i.e. A = 0 and B spans directions the layer cannot produce. `decompose` reports it per
layer (`info["null_dim"]`, `info["tail_is_null_space"]`) and warns once with the numbers.

`boundary(eigens, r, select)` reports the eigengap at a selection boundary and flags it when the
accumulation or eigensolve precision cannot resolve it (gap below `info["resolution"]`, an estimate of
the decomposed matrix's rounding error: max(eps(accumulation dtype) * sqrt(tokens), eps(eig dtype)) *
lambda_max; by Davis-Kahan the selected subspace is then not determined by the data).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from enum import StrEnum
from typing import Any

import torch

from astra.erank import release_effective_rank

log = logging.getLogger("astra.eigen")


class EigDtype(StrEnum):
    fp32 = "fp32"
    fp64 = "fp64"


class Select(StrEnum):
    tail = "tail"
    head = "head"
    middle = "middle"
    random = "random"


EIG_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
SELECTS = tuple(Select)
_warned_null_space = False


class Eigens:
    """All eigenpairs of one layer's statistic: values (d,) ascending, vectors (d, d) as columns, info.

    `range_vectors` (d, k): when the statistic has a null space found structurally (the range solver),
    the eigenvectors of its k non-zero eigenvalues = the last k columns of `vectors`; the (d, d - k)
    null-space block (complete-QR complement of `range_vectors`) is then only formed when `vectors` is first read,
    so a head selection, or a cache that stores the range only, never pays for it.
    """

    def __init__(
        self,
        values: torch.Tensor,
        vectors: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
        range_vectors: torch.Tensor | None = None,
    ):
        if vectors is None and range_vectors is None:
            raise ValueError("Eigens needs vectors or range_vectors")
        self.values, self._vectors, self.info = values, vectors, info if info is not None else {}
        self.range_vectors = range_vectors

    @property
    def vectors(self) -> torch.Tensor:
        if self._vectors is None:
            d, k = self.range_vectors.shape
            null = null_space_columns(self.range_vectors, d - k)
            self._vectors = torch.cat([null, self.range_vectors], dim=1)
        return self._vectors


def _matrix(stats: Any) -> torch.Tensor:
    return stats if isinstance(stats, torch.Tensor) else stats.matrix


def decompose(stats: Any, eig_dtype: str = "fp32") -> Eigens:
    """Eigenpairs of a `LayerStats` (or a symmetric matrix (d, d)) in `eig_dtype` (see the module doc)."""
    if eig_dtype not in EIG_DTYPES:
        raise ValueError(f"eig_dtype={eig_dtype!r}; valid: {', '.join(EIG_DTYPES)}")
    dtype = EIG_DTYPES[eig_dtype]
    moment = getattr(stats, "input_moment", None)
    w_aug = getattr(stats, "weight_aug", None)
    d = w_aug.shape[0] if w_aug is not None else _matrix(stats).shape[0]
    accum = moment.dtype if moment is not None else _matrix(stats).dtype
    range_vectors = vectors = None
    if moment is not None and w_aug is not None and d > moment.shape[0]:  # never forms the d_out^2 matrix
        values, range_vectors = range_eigens(w_aug, moment, dtype)
        rank = range_vectors.shape[1]
        info = {"solver": "range", "range_dim": moment.shape[0], "null_dim": d - rank}
    else:
        values, vectors = torch.linalg.eigh(_matrix(stats).to(dtype))
        info = {"solver": "eigh", "null_dim": 0}
    if not bool(torch.isfinite(values).all()):  # never select, initialise or cache from a NaN spectrum
        raise FloatingPointError(
            f"non-finite eigenvalues in layer {getattr(stats, 'name', '?')!r} ({eig_dtype})"
        )
    tokens = getattr(stats, "tokens", 0)
    info.update(spectrum_summary(values))
    info["resolution"] = resolution(values, accum, tokens, dtype)
    info["tail_is_null_space"] = info["null_dim"] > 0
    if info["null_dim"]:
        _warn_null_space(getattr(stats, "name", "?"), d, info["null_dim"])
    return Eigens(values, vectors, info, range_vectors)


def range_eigens(
    w_aug: torch.Tensor, moment: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (d_out,) ascending, range eigenvectors (d_out, k)) of C = w_aug P w_aug^T.

    w_aug (d_out, m), P (m, m) PSD, m < d_out. The m-sized eigenproblems run in fp64 (cheap: m^3):
    P = L L^T, G = F^T F = L^T W^T W L = Q diag(S^2) Q^T with F = w_aug L, so C's range eigenpairs are
    (S^2, F Q / S) for S^2 above 1e-10 S^2_max (smaller ones are 0 to the accuracy of any fp32 input;
    their directions join the null space); the first d_out - k values are exactly 0. F Q / S is made
    exactly orthonormal by one Cholesky-QR step (it is orthonormal to ~1e-6 already, so R ~ I).
    """
    F = w_aug.double() @ psd_factor(moment)  # (d_out, m), C = F F^T
    s2, Q = torch.linalg.eigh(F.T @ F)  # ascending
    keep = s2 > 1e-10 * float(s2.max())  # ascending: the kept ones are the last k
    U = F @ Q[:, keep]  # (d_out, k)
    del F  # d_out x m fp64: free before the next one
    U /= s2[keep].sqrt()
    R = torch.linalg.cholesky(U.T @ U, upper=True)
    U = torch.linalg.solve_triangular(R, U, upper=True, left=False)  # U R^-1: orthonormal columns
    values = torch.cat([torch.zeros(U.shape[0] - U.shape[1], dtype=torch.float64, device=U.device), s2[keep]])
    return values.to(dtype), U.to(dtype)


_last_factor: tuple[weakref.ref, torch.Tensor] | None = None  # (P, its factor) while that P lives


def _forget_factor(_: weakref.ref) -> None:
    global _last_factor
    _last_factor = None


def psd_factor(moment: torch.Tensor) -> torch.Tensor:
    """L (fp64) with P = L L^T (eigh, negative round-off clipped). The layers of a group reading one input
    (gate/up) receive the same P object and are decomposed one after the other: they share one eigh. The
    factor is dropped with P (a replaced entry's reference dies first, so its callback never runs)."""
    global _last_factor
    if _last_factor is None or _last_factor[0]() is not moment:
        P = moment.double()
        lam, Q = torch.linalg.eigh((P + P.T) / 2)
        _last_factor = (weakref.ref(moment, _forget_factor), Q * lam.clamp(min=0).sqrt())
    return _last_factor[1]


def resolution(values: torch.Tensor, accum: torch.dtype, tokens: int, solve: torch.dtype) -> float:
    """Estimated rounding error (spectral norm) of the statistic as decomposed (see the module doc): the
    accumulation's or, when larger, the eigensolve's backward error eps(solve dtype) * lambda_max (an fp64
    statistic solved in fp32 loses gaps of ~1e-7 lambda_max: docs/performance.md)."""
    eps = torch.finfo(accum).eps if accum.is_floating_point else 0.0
    worst = max(eps * max(tokens, 1) ** 0.5, torch.finfo(solve).eps)
    return float(worst * float(values.abs().max()))


def _warn_null_space(name: str, d: int, null_dim: int) -> None:
    global _warned_null_space
    log.info("layer %s: d_out=%d, output covariance rank <= %d: its %d smallest eigenvalues are 0 "
             "(null space of W^T; a tail selection there gives A = V^T W = 0)", name, d, d - null_dim, null_dim)  # fmt: skip
    if not _warned_null_space:
        _warned_null_space = True
        warnings.warn(
            f"layer {name}: d_out={d} exceeds the rank {d - null_dim} of its output covariance "
            f"(C = W Cov(x) W^T): its {null_dim} smallest eigenvalues are exactly 0 and their eigenvectors "
            "span the null space of W^T, so select=tail within them gives A = V^T W = 0 "
            "(reported per layer as info['tail_is_null_space']; warned once)",
            stacklevel=3,
        )


def boundary(eigens: Eigens, r: int, select: str) -> dict[str, Any]:
    """Eigengap at the edge of a rank-r head/tail selection, and whether the accumulation resolves it."""
    v, d = eigens.values.double(), eigens.values.shape[0]
    if select not in ("head", "tail") or r >= d:
        return {"gap": None, "relative_gap": None, "resolved": True}
    inside, outside = (v[d - r], v[d - r - 1]) if select == "head" else (v[r - 1], v[r])
    gap = float((inside - outside).abs())
    scale = max(float(v.abs().max()), 1e-300)
    return {"gap": gap, "relative_gap": gap / scale, "resolved": gap > eigens.info.get("resolution", 0.0)}


def random_orthonormal(d: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded random orthonormal basis (d, k): QR of a Gaussian matrix, signs fixed by R's diagonal."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def candidate_columns(vectors: torch.Tensor, k: int, select: str, seed: int = 0) -> torch.Tensor:
    """The k columns of `vectors` (d, d; ascending eigenvalues) that a rank-r <= k selection draws from.

    head: Q[:, d-k:] (the release's "IPM" `V[:, -r:]` is its last r columns); tail: Q[:, :k] ("KPM");
    middle: Q[:, d//2 : d//2 + k] (the release's other branch); random: a seeded orthonormal (d, k).
    """
    d = vectors.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"cannot select {k} eigenvectors of a {d}-dimensional covariance")
    if select == "head":
        return vectors[:, d - k :]
    if select == "tail":
        return vectors[:, :k]
    if select == "middle":
        if d // 2 + k > d:
            raise ValueError(
                f"select=middle takes columns {d // 2}..{d // 2 + k - 1} but the covariance is {d}x{d}"
            )
        return vectors[:, d // 2 : d // 2 + k]
    if select == "random":
        return random_orthonormal(d, k, seed, vectors.dtype).to(vectors.device)
    raise ValueError(f"select={select!r}; valid: {', '.join(SELECTS)}")


def select_columns(eigens: Eigens, k: int, select: str, seed: int = 0) -> torch.Tensor:
    """`candidate_columns` of an `Eigens`, without forming its null-space block when a head selection
    lies in the range (the last k columns of `vectors` are the last k of `range_vectors`)."""
    rv = eigens.range_vectors
    if rv is None or eigens._vectors is not None:
        return candidate_columns(eigens.vectors, k, select, seed)
    d, rank = rv.shape
    if select == "head" and 1 <= k <= rank:
        return rv[:, rank - k :]
    if select == "tail" and 1 <= k <= d - rank:
        return null_space_columns(rv, k)
    if select == "random" and 1 <= k <= d:  # needs no eigenvector
        return random_orthonormal(d, k, seed, rv.dtype).to(rv.device)
    return candidate_columns(eigens.vectors, k, select, seed)


def null_space_columns(range_vectors: torch.Tensor, k: int) -> torch.Tensor:
    """The first k columns of the complete-QR complement of `range_vectors` (d, m): Householder
    reflectors applied to k unit vectors (d k m work) instead of forming the (d, d) Q (d^2 m)."""
    d, m = range_vectors.shape
    reflectors, tau = torch.geqrf(range_vectors)
    unit = torch.zeros(d, k, dtype=range_vectors.dtype, device=range_vectors.device)
    unit[m + torch.arange(k), torch.arange(k)] = 1
    return torch.ormqr(reflectors, tau, unit)


def spectrum_summary(values: torch.Tensor) -> dict[str, Any]:
    """Effective rank, condition number (None when lambda_min <= 0), numerical rank of a spectrum."""
    v = values.double()
    lo, hi = float(v.min()), float(v.max())
    tol = hi * v.numel() * torch.finfo(values.dtype).eps
    return {
        "effective_rank": release_effective_rank(values),  # the release's definition (astra.erank)
        "condition_number": hi / lo if lo > 0 else None,
        "lambda_min": lo,
        "lambda_max": hi,
        "numerical_rank": int((v > tol).sum()),
        "trace": float(v.sum()),
    }


def principal_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spaces of a (d, r) and b (d, r)."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    s = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    # sin of the largest angle = ||(I - qa qa^T) qb||_2: accurate for tiny angles (acos of s is not)
    sin = torch.linalg.matrix_norm(qb - qa @ (qa.T @ qb), ord=2).clamp(max=1.0)
    return (
        float(torch.rad2deg(torch.asin(sin)))
        if float(s.min()) > 0.5
        else float(torch.rad2deg(torch.acos(s.min())))
    )
