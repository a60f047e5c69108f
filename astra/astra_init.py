"""Astra (Liu et al. 2026, arXiv 2602.19111): LoRA initialised from eigenvectors of the covariance of a
linear layer's output activations on a calibration set.

For a target layer with weight W (d_out, d_in) and output covariance C = Q diag(lambda) Q^T:

    V = Q[:, S]   (d_out, r)     S = the r smallest (tail), largest (head), middle, or a random basis
    B = V,  A = V^T W,  W_res = W - s B A,   s = alpha / r  (alpha / sqrt(r) with rsLoRA)

so W_res + s B A = W: the model's function is unchanged at step 0. Two presets of one method
(docs/astra.md): `astra` is the paper's text, `astra_code` the authors' released code (LyoAI/Astra
`astra.py`); they are two YAMLs over one class and one schema, every aspect in which they differ an
independent field of `AstraMethodConfig`.

Through the one build path (`astra.build`): `needs = "output_cov"`; `reduce` = the eigendecomposition
of a layer's covariance (rank- and selection-independent, so it is what the content cache holds);
`allocate` = the release's effective-rank rank allocation; `init` = the pure per-layer factors.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from torch import nn

from astra.config import MethodConfig, not_in_signature
from astra.eigen import EigDtype, Eigens, Select, boundary, candidate_columns, decompose, select_columns
from astra.erank import release_effective_rank
from astra.methods import InitMethod, LayerSpec, LoraInit, Reduced, register
from astra.stats import AccumDtype, Accumulate, Engine, Normalizer, Offload, SampleNorm


class RankAllocation(StrEnum):
    none = "none"
    effective_rank = "effective_rank"  # the release's --rank_allocation


@dataclass
class AstraMethodConfig(MethodConfig):
    """Astra options; defaults = the paper's text (`conf/method/astra.yaml` holds only the diffs)."""

    select: Select = Select.tail
    centered: bool = True  # C = E[yy^T] - E[y]E[y]^T (paper Eq. 2); release: uncentred
    sample_norm: SampleNorm = SampleNorm.none  # release: each forward's Y / abs(max(Y))
    mask_padding: bool = True  # release: padding positions included
    normalizer: Normalizer = Normalizer.tokens  # release: number of forward calls
    accum_dtype: AccumDtype = (
        AccumDtype.fp32
    )  # model = the model's dtype (release: --use_float16_for_covariance)
    eig_dtype: EigDtype = EigDtype.fp32  # dtype of torch.linalg.eigh
    rank_allocation: RankAllocation = RankAllocation.none
    min_rank: int = 1  # effective-rank allocation bounds (release: 1 and max(2r, 256))
    max_rank: int | None = None
    select_seed: int = 0  # seed of select=random
    stats_engine: Engine = not_in_signature(Engine.sequential)  # exact either way (astra.stats)
    stats_offload: Offload = not_in_signature(Offload.none)  # cached hidden states: none | cpu | disk (exact)
    accumulate: Accumulate = not_in_signature(Accumulate.auto)  # exact either way (astra.stats)
    cache: bool = not_in_signature(True)  # content-keyed cache of the eigendecompositions


# --------------------------------------------------------------------------------------------
# pure per-layer maths
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def astra_factors(
    weight: torch.Tensor, vectors: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r), W_res (d_out, d_in)) in `weight`'s dtype.

    Computed in fp32 (fp64 for an fp64 weight); W_res is formed from the *cast* factors, so
    W_res + s B A reproduces W up to the rounding of W_res itself.
    """
    dtype, work = weight.dtype, torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(work)
    v = vectors.to(device=w.device, dtype=work)
    B = v.contiguous().to(dtype)
    A = (v.T @ w).contiguous().to(dtype)
    residual = (w - scaling * (B.to(work) @ A.to(work))).to(dtype)
    return A, B, residual


def allocate_ranks(
    scores: dict[str, float], base_rank: int, min_rank: int = 1, max_rank: int | dict[str, int] | None = None
) -> dict[str, int]:
    """The release's `allocate_fn`: ranks proportional to log(1 + score), total = n_layers * base_rank.

    `max_rank` may be per layer (a rank cannot exceed the layer's d_out); default max(2r, 256).
    """
    default_max = max(2 * base_rank, 256) if max_rank is None or isinstance(max_rank, dict) else max_rank
    bound = {
        n: min(default_max, max_rank.get(n, default_max)) if isinstance(max_rank, dict) else default_max
        for n in scores
    }
    normalized = {n: float(np.log(s + 1)) for n, s in scores.items()}
    total, budget = sum(normalized.values()), len(scores) * base_rank
    ranks = {n: max(min_rank, min(int(round(s / total * budget)), bound[n])) for n, s in normalized.items()}
    diff = budget - sum(ranks.values())
    order = sorted(ranks, key=lambda n: normalized[n], reverse=True)
    # +-1 cyclically over layers by descending score, as released; unlike the release (one pass of
    # |diff| steps), a layer at its bound is skipped *without* using up a step, so the total is kept
    i = stalled = 0
    while diff != 0 and stalled < len(order):
        name, step = order[i % len(order)], 1 if diff > 0 else -1
        i += 1
        if (step > 0 and ranks[name] < bound[name]) or (step < 0 and ranks[name] > min_rank):
            ranks[name] += step
            diff -= step
            stalled = 0
        else:
            stalled += 1
    return ranks


def selected_energy(values: torch.Tensor, vectors: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """diag(V^T C V) (k,) of `columns` V (d, k), with C = Q diag(values) Q^T from its eigenpairs."""
    coeff = vectors.T.to(columns.dtype) @ columns  # (d, k): coordinates of V in the eigenbasis
    return (coeff.square() * values.to(columns.dtype)[:, None]).sum(0)


def astra_init(weight: torch.Tensor, eigens: Eigens, spec: LayerSpec) -> LoraInit:
    """The Astra init of one layer from its covariance's eigenpairs: values (d_out,) ascending and all
    eigenvectors (d_out, d_out), or only `range_vectors` (d_out, k) when the other d_out - k span the
    null space (eigenvalue exactly 0; `astra.eigen.Eigens` forms that block only if a selection needs it).

    `info`: rank, selection, the fraction of trace(C) in the selected directions, and the eigengap at
    the selection boundary (`astra.eigen.boundary`: whether the accumulation precision resolves it).
    """
    m, d_out, r = spec.method, weight.shape[0], spec.rank
    values = eigens.values
    basis = eigens.range_vectors if eigens.range_vectors is not None else eigens.vectors  # (d_out, k)
    if basis.shape[0] != d_out:
        raise ValueError(f"eigenvectors of dimension {basis.shape[0]} for a layer with d_out={d_out}")
    if r > d_out:
        raise ValueError(
            f"layer {spec.name}: rank {r} exceeds d_out={d_out} (an eigenbasis has d_out vectors)"
        )
    seed = layer_seed(m.select_seed, spec.name)
    if m.select == "random":  # a seeded basis of R^d_out: no eigenvector needed
        columns = candidate_columns(basis, r, "random", seed)
    else:
        columns = select_columns(eigens, r, str(m.select), seed)
    columns = columns.contiguous()
    A, B, residual = astra_factors(weight, columns, spec.scaling)
    in_basis = values[d_out - basis.shape[1] :]  # eigenvalues of `basis`; the null block's are exactly 0
    energy = float(selected_energy(in_basis, basis, columns).double().sum()) / max(
        float(values.double().sum()), 1e-300
    )
    info = {"rank": r, "select": str(m.select), "energy_fraction": energy,
            "boundary": boundary(eigens, r, str(m.select))}  # fmt: skip
    return LoraInit(A=A, B=B, residual=residual, info=info)


def layer_seed(seed: int, name: str) -> int:
    """Per-layer seed of select=random (stable across runs: crc32 of the layer name)."""
    return seed + zlib.crc32(name.encode())


def warn_rank_deficient(tokens: int, d_out: int) -> None:
    """Warn (once per size) that fewer calibration tokens than d_out made the covariance rank-deficient."""
    warnings.warn(
        f"calibration covariance is rank-deficient: {tokens} calibration tokens < d_out = {d_out}. Its smallest "
        "eigenvalues are 0 and select=tail picks an arbitrary basis of the null space; use more calibration "
        "tokens (calib.n, calib.seq_len).",
        stacklevel=2,
    )


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------


@register
class Astra(InitMethod):
    """Astra. `astra_code` is a preset: conf/method/astra_code.yaml on this class's schema, no code."""

    name = "astra"
    needs = "output_cov"
    schema = AstraMethodConfig

    def check(self, cfg: Any) -> None:
        if cfg.dropout != 0:
            raise ValueError(f"method.dropout={cfg.dropout}: Astra requires lora_dropout = 0 (the init preserves "
                             "W x only without dropout on the adapter path, as the release requires)")  # fmt: skip
        if cfg.rank_allocation != "none" and cfg.rank_pattern:
            raise ValueError(
                "method.rank_allocation=effective_rank computes the rank pattern; unset method.rank_pattern"
            )

    def reduce(self, stats: Any, cfg: Any) -> Reduced:
        """Eigenpairs of one layer's output covariance (`stats.matrix`, (d_out, d_out)), for any rank and any
        selection: values (d_out,), vectors (d_out, d_out) or, when C has a null space, (d_out, rank C)."""
        eig = decompose(stats, str(cfg.eig_dtype))
        vectors = eig.range_vectors if eig.range_vectors is not None else eig.vectors
        meta = {
            **eig.info,
            "tokens": int(stats.tokens),
            "rank_deficient": int(stats.tokens) < eig.values.numel(),
        }
        # a d_out > d_in layer keeps only its range eigenvectors (d_out, d_in + 1): the null-space basis is
        # formed from them when a selection needs it, so a LLaMA-7B gate/up entry is 11008 x 4097, not 11008^2
        return Reduced(tensors={"values": eig.values, "vectors": vectors.contiguous()}, meta=meta)

    def reduce_options(self, cfg: Any) -> dict[str, Any]:
        return {"eig_dtype": str(cfg.eig_dtype)}

    def init(self, weight: torch.Tensor, stats: Any, spec: LayerSpec) -> LoraInit:
        """Factors of one layer from `stats`: its `Reduced` eigenpairs, or a LayerStats to decompose first."""
        reduced = stats if isinstance(stats, Reduced) else self.reduce(stats, spec.method)
        if reduced.meta.get("rank_deficient"):
            warn_rank_deficient(reduced.meta["tokens"], weight.shape[0])
        values, vectors = reduced.tensors["values"], reduced.tensors["vectors"]
        if vectors.shape[1] < vectors.shape[0]:  # the range only (see `reduce`)
            eigens = Eigens(values, None, dict(reduced.meta), range_vectors=vectors)
        else:
            eigens = Eigens(values, vectors, dict(reduced.meta))
        init = astra_init(weight, eigens, spec)
        init.info = {**reduced.meta, **init.info}
        return init

    def allocates(self, cfg: Any) -> bool:
        return cfg.rank_allocation == "effective_rank"

    def allocate(
        self, reduced: dict[str, Reduced], targets: dict[str, nn.Linear], cfg: Any
    ) -> dict[str, int]:
        """The release's allocation: ranks ~ log(1 + release effective rank), total n_layers * r."""
        scores = {n: release_effective_rank(r.tensors["values"]) for n, r in reduced.items()}
        caps = {n: min(targets[n].out_features, cfg.max_rank or max(2 * cfg.rank, 256)) for n in scores}
        return allocate_ranks(scores, cfg.rank, cfg.min_rank, caps)
