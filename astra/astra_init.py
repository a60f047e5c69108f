"""Astra (Liu et al. 2026, arXiv 2602.19111): LoRA initialised from eigenvectors of the covariance of a
linear layer's output activations on a calibration set.

For a target layer with weight W (d_out, d_in) and output covariance C = Q diag(lambda) Q^T:

    V = Q[:, S]   (d_out, r)     S = the r smallest (tail), largest (head), middle, or a random basis
    B = V,  A = V^T W,  W_res = W - s B A,   s = alpha / r  (alpha / sqrt(r) with rsLoRA)

so W_res + s B A = W: the model's function is unchanged at step 0. Two presets (docs/astra.md):
`astra` is the paper's text, `astra_code` the authors' released code (LyoAI/Astra `astra.py`); every
aspect in which they differ is an independent field of `AstraMethodConfig`.

The per-layer maths are pure functions (`eigendecompose`, `candidate_columns`, `astra_factors`,
`allocate_ranks`); `Astra.build` runs them on a model: statistics of the unmodified base model
(block by block, see `astra.stats`), eigenvectors cached by content (`astra.cache`), optional
effective-rank rank allocation (which must precede the PEFT wrap), then PEFT LoRA wrap and init.
"""

from __future__ import annotations

import logging
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from astra.adapters import init_each, lora_config, lora_layers
from astra.config import MethodConfig
from astra.methods import BuildContext, BuildReport, InitMethod, LoraInit, Timer, register
from astra.stats import ACCUM_DTYPES, GROUPINGS, NORMALIZERS, SAMPLE_NORMS, stat_options, stream_covariances

log = logging.getLogger("astra.astra_init")

SELECTS = ("tail", "head", "middle", "random")
EIG_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
RANK_ALLOCATIONS = ("none", "effective_rank")
PEFT_PREFIX = "base_model.model."


@dataclass
class AstraMethodConfig(MethodConfig):
    """Astra options; defaults = the paper's text (`conf/method/astra.yaml`)."""

    name: str = "astra"
    select: str = "tail"  # tail | head | middle | random (seeded orthonormal basis, the control)
    centered: bool = True  # C = E[yy^T] - E[y]E[y]^T (paper Eq. 2); release: uncentred
    sample_norm: str = "none"  # none | max_abs (release: each forward's Y / abs(max(Y)))
    mask_padding: bool = True  # release: padding positions included
    normalizer: str = "tokens"  # tokens | forwards (release: number of forward calls)
    accum_dtype: str = "fp32"  # fp32 | fp64 | model
    eig_dtype: str = "fp32"  # fp32 | fp64 dtype of torch.linalg.eigh
    rank_allocation: str = "none"  # none | effective_rank (release's --rank_allocation)
    min_rank: int = 1  # effective-rank allocation bounds (release: 1 and max(2r, 256))
    max_rank: int | None = None
    select_seed: int = 0  # seed of select=random
    stats_grouping: str = "block"  # block (memory: one block's covariances) | all (one pass)
    cache: bool = True  # content-keyed cache of eigenvalues and selected eigenvectors
    cache_covariances: bool = False  # also store the covariances (large: d_out^2 per layer)


# --------------------------------------------------------------------------------------------
# pure per-layer maths
# --------------------------------------------------------------------------------------------


@dataclass
class LayerEigens:
    """What Astra keeps of one layer's covariance after its eigendecomposition."""

    values: torch.Tensor  # (d,) all eigenvalues, ascending
    vectors: torch.Tensor  # (d, k) candidate eigenvectors, in the order the selection takes them
    column_energy: torch.Tensor  # (k,) v_j^T C v_j of each candidate (= its eigenvalue, unless random)
    select: str
    tokens: int = 0  # calibration rows that entered the covariance
    info: dict[str, Any] = field(default_factory=dict)


def eigendecompose(cov: torch.Tensor, eig_dtype: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues (d,) ascending, eigenvectors (d, d) as columns) of a symmetric `cov` (d, d)."""
    if eig_dtype not in EIG_DTYPES:
        raise ValueError(f"eig_dtype={eig_dtype!r}; valid: {', '.join(EIG_DTYPES)}")
    return torch.linalg.eigh(cov.to(EIG_DTYPES[eig_dtype]))


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


def take_rank(columns: torch.Tensor, r: int, select: str) -> slice:
    """Which of the k candidate columns a rank-r selection uses (head: the last r, else the first r)."""
    k = columns.shape[-1]
    if r > k:
        raise ValueError(f"rank {r} exceeds the {k} eigenvectors kept for this layer")
    return slice(k - r, k) if select == "head" else slice(0, r)


def effective_rank(values: torch.Tensor, eps: float = 1e-8) -> float:
    """exp(entropy of the normalised spectrum), the release's `stable_effective_rank_fn`."""
    s = values.float().clamp(min=eps)
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p + eps)).sum()))


def spectrum_summary(values: torch.Tensor) -> dict[str, Any]:
    """Effective rank, condition number (None when lambda_min <= 0), numerical rank of a spectrum."""
    v = values.double()
    lo, hi = float(v.min()), float(v.max())
    tol = hi * v.numel() * torch.finfo(values.dtype).eps
    return {
        "effective_rank": effective_rank(values),
        "condition_number": hi / lo if lo > 0 else None,
        "lambda_min": lo,
        "lambda_max": hi,
        "numerical_rank": int((v > tol).sum()),
        "trace": float(v.sum()),
    }


def layer_eigens(
    cov: torch.Tensor, k: int, select: str, eig_dtype: str = "fp32", seed: int = 0
) -> LayerEigens:
    """Eigendecompose `cov` (d, d) and keep the k candidate columns of `select`."""
    values, vectors = eigendecompose(cov, eig_dtype)
    columns = candidate_columns(vectors, k, select, seed).contiguous()
    cov_e = cov.to(columns.dtype)
    energy = ((cov_e @ columns) * columns).sum(0)  # (k,) diag(V^T C V)
    return LayerEigens(
        values=values, vectors=columns, column_energy=energy, select=select, info=spectrum_summary(values)
    )


@torch.no_grad()
def astra_factors(
    weight: torch.Tensor, vectors: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r), W_res (d_out, d_in)) in `weight`'s dtype.

    Computed in fp32; W_res is formed from the *cast* factors (B.float() @ A.float()), so
    W_res + s B A reproduces W up to the rounding of W_res itself.
    """
    dtype = weight.dtype
    w = weight.float()
    v = vectors.to(device=w.device, dtype=torch.float32)
    B = v.contiguous().to(dtype)
    A = (v.T @ w).contiguous().to(dtype)
    residual = (w - scaling * (B.float() @ A.float())).to(dtype)
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


def astra_init(weight: torch.Tensor, eigens: LayerEigens, rank: int, scaling: float) -> LoraInit:
    """The Astra init of one layer from its kept eigenvectors, with its spectrum summary in `info`."""
    d_out = weight.shape[0]
    if eigens.vectors.shape[0] != d_out:
        raise ValueError(
            f"eigenvectors of dimension {eigens.vectors.shape[0]} for a layer with d_out={d_out}"
        )
    cols = take_rank(eigens.vectors, rank, eigens.select)
    A, B, residual = astra_factors(weight, eigens.vectors[:, cols], scaling)
    energy = float(eigens.column_energy[cols].double().sum()) / max(
        float(eigens.values.double().sum()), 1e-300
    )
    info = {
        **eigens.info,
        "rank": rank,
        "select": eigens.select,
        "energy_fraction": energy,
        "tokens": eigens.tokens,
    }
    return LoraInit(A=A, B=B, residual=residual, info=info)


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------


def validate(m: Any) -> None:
    """Clear errors for invalid Astra options (and lora_dropout != 0, which the release forbids)."""
    choices = {"select": SELECTS, "eig_dtype": tuple(EIG_DTYPES), "rank_allocation": RANK_ALLOCATIONS,
               "sample_norm": SAMPLE_NORMS, "normalizer": NORMALIZERS, "accum_dtype": tuple(ACCUM_DTYPES),
               "stats_grouping": GROUPINGS}  # fmt: skip
    for key, valid in choices.items():
        if m[key] not in valid:
            raise ValueError(f"method.{key}={m[key]!r}; valid: {', '.join(valid)}")
    if m.dropout != 0:
        raise ValueError(f"method.dropout={m.dropout}: Astra requires lora_dropout = 0 (the init preserves "
                         "W x only without dropout on the adapter path, as the release requires)")  # fmt: skip
    if m.rank_allocation != "none" and m.rank_pattern:
        raise ValueError(
            "method.rank_allocation=effective_rank computes the rank pattern; unset method.rank_pattern"
        )


def target_linears(model: nn.Module, config: Any) -> dict[str, nn.Linear]:
    """The base model's nn.Linear layers that PEFT will wrap for `config` (same matching rule)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and check_target_module_exists(config, n)
    }


def layer_seed(seed: int, name: str) -> int:
    return seed + zlib.crc32(name.encode())


def columns_to_keep(m: Any, name: str, d_out: int, rank_pattern: dict[str, int]) -> int:
    """How many candidate eigenvectors a layer needs: its rank, or the allocation's upper bound."""
    if m.rank_allocation == "effective_rank":
        return min(d_out, m.max_rank or max(2 * m.rank, 256))
    rank = rank_pattern.get(get_pattern_key(list(rank_pattern), name), m.rank)
    if rank > d_out:
        raise ValueError(f"layer {name}: rank {rank} exceeds d_out={d_out} (an eigenbasis has d_out vectors)")
    return rank


def warn_rank_deficient(eigens: dict[str, LayerEigens], d_outs: dict[str, int]) -> None:
    short = {n: (e.tokens, d_outs[n]) for n, e in eigens.items() if e.tokens < d_outs[n]}
    if short:
        name, (tokens, d) = next(iter(short.items()))
        warnings.warn(
            f"calibration covariance is rank-deficient in {len(short)}/{len(eigens)} layers: {tokens} calibration "
            f"tokens < d_out = {d} (e.g. {name}). Its smallest eigenvalues are 0 and select=tail picks an "
            f"arbitrary basis of the null space; use more calibration tokens (calib.n, calib.seq_len).",
            stacklevel=2,
        )
    for name in short:
        eigens[name].info["rank_deficient"] = True


@register
class Astra(InitMethod):
    """Astra, the paper's text: tail eigenvectors of the centred, token-normalised output covariance."""

    name = "astra"
    needs = "output_cov"
    schema = AstraMethodConfig

    def init(self, weight: torch.Tensor, stats: Any, cfg: Any) -> LoraInit:
        """Per-layer init. `stats`: a `LayerEigens`, or a covariance (d_out, d_out) to decompose;
        `cfg`: a `LayerSpec` (rank, scaling, method config)."""
        m = cfg.method
        if isinstance(stats, torch.Tensor):
            stats = layer_eigens(stats, cfg.rank, m.select, m.eig_dtype, layer_seed(m.select_seed, cfg.name))
        return astra_init(weight, stats, cfg.rank, cfg.scaling)

    def build(self, model: nn.Module, ctx: BuildContext) -> tuple[nn.Module, BuildReport]:
        m, report = ctx.cfg.method, BuildReport()
        validate(m)
        with Timer() as timer:
            config = lora_config(self, ctx)
            targets = target_linears(model, config)
            if not targets:
                raise ValueError(
                    f"target_modules {sorted(config.target_modules)} match no nn.Linear of the model"
                )
            eigens = self.layer_eigens(model, targets, ctx, report)
            if m.rank_allocation == "effective_rank":
                config.rank_pattern = self.allocated_pattern(eigens, targets, m, report)
            peft_model = get_peft_model(model, config)
            layers = lora_layers(peft_model)
            per_layer = ((name, eigens.pop(name.removeprefix(PEFT_PREFIX))) for name in layers)
            init_each(layers, per_layer, self, m, report)
        report.init_seconds = timer.seconds
        return peft_model, report

    @staticmethod
    def allocated_pattern(
        eigens: dict[str, LayerEigens], targets: dict[str, nn.Linear], m: Any, report: BuildReport
    ) -> dict[str, int]:
        scores = {n: e.info["effective_rank"] for n, e in eigens.items()}
        caps = {n: min(targets[n].out_features, m.max_rank or max(2 * m.rank, 256)) for n in scores}
        ranks = allocate_ranks(scores, m.rank, m.min_rank, caps)
        report.extra["rank_allocation"] = ranks
        return {re.escape(n): r for n, r in ranks.items()}  # PEFT treats keys as regexes

    def layer_eigens(
        self, model: nn.Module, targets: dict[str, nn.Linear], ctx: BuildContext, report: BuildReport
    ) -> dict[str, LayerEigens]:
        """Eigens of every target layer: from the content-keyed cache, or collected block by block."""
        from astra.cache import TensorCache
        from astra.calib import batches_digest
        from astra.stats import calibration_summary

        m = ctx.cfg.method
        if ctx.calib_batches is None:
            raise ValueError("Astra needs calibration batches (BuildContext.calib_batches is None)")
        batches = list(ctx.calib_batches())
        options = stat_options(m, "output_cov")
        report.extra.update(calibration_summary(batches, options))
        keep = {
            n: columns_to_keep(m, n, lin.out_features, dict(m.rank_pattern)) for n, lin in targets.items()
        }
        material = cache_material(ctx, targets, batches_digest(batches), options.as_dict(), keep)
        cache = TensorCache(ctx.cache_dir, "astra") if m.cache and ctx.cache_dir else None
        cached = cache.load(material) if cache else None
        report.extra["cache"] = "hit" if cached else ("miss" if cache else "off")
        if cached:
            eigens = eigens_from_tensors(*cached, m.select)
        else:
            eigens, covariances = collect_eigens(model, targets, batches, options, m, keep)
            if cache:
                tensors, extra = eigens_to_tensors(eigens)
                tensors.update({f"{n}.covariance": c for n, c in covariances.items()})
                report.extra["cache_path"] = str(cache.save(material, tensors, extra))
        warn_rank_deficient(eigens, {n: lin.out_features for n, lin in targets.items()})
        return eigens


def collect_eigens(
    model: nn.Module, targets: dict[str, nn.Linear], batches: list, options: Any, m: Any, keep: dict[str, int]
) -> tuple[dict[str, LayerEigens], dict[str, torch.Tensor]]:
    """Stream covariances group by group; each is decomposed and dropped as soon as it is complete."""
    eigens, covariances = {}, {}
    with Timer() as timer:
        for name, acc in stream_covariances(model, targets, batches, options, m.stats_grouping):
            cov = acc.covariance()
            eig = layer_eigens(cov, keep[name], m.select, m.eig_dtype, layer_seed(m.select_seed, name))
            eig.tokens = acc.tokens
            eigens[name] = eig
            if m.cache_covariances:
                covariances[name] = cov.float().cpu()
            del cov, acc
    log.info("Astra statistics and eigendecompositions of %d layers: %.2fs", len(eigens), timer.seconds)
    return eigens, covariances


def cache_material(
    ctx: BuildContext, targets: dict[str, nn.Linear], calib_digest: str, options: dict, keep: dict[str, int]
) -> dict[str, Any]:
    """Everything the cached eigens depend on (see `astra.cache`)."""
    from astra.cache import weight_fingerprint

    m, c = ctx.cfg.method, ctx.cfg.calib
    calib_keys = ("n", "seq_len", "batch_size", "seed", "format", "path", "padding", "drop_last_token")
    return {
        "kind": "astra-eigens/v1",
        "model_id": ctx.model_id,
        "layers": {
            n: [lin.out_features, lin.in_features, weight_fingerprint(lin.weight)]
            for n, lin in targets.items()
        },
        "calib_digest": calib_digest,
        "calib": {k: c.get(k) for k in calib_keys},
        "stats": options,
        "select": m.select,
        "select_seed": m.select_seed if m.select == "random" else None,
        "eig_dtype": m.eig_dtype,
        "columns": keep,
        "cache_covariances": m.cache_covariances,
    }


def eigens_to_tensors(eigens: dict[str, LayerEigens]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for n, e in eigens.items():
        tensors.update(
            {f"{n}.values": e.values, f"{n}.vectors": e.vectors, f"{n}.column_energy": e.column_energy}
        )
    extra = {n: {"tokens": e.tokens, "info": e.info} for n, e in eigens.items()}
    return tensors, extra


def eigens_from_tensors(
    tensors: dict[str, torch.Tensor], extra: dict[str, Any], select: str
) -> dict[str, LayerEigens]:
    return {
        n: LayerEigens(
            values=tensors[f"{n}.values"],
            vectors=tensors[f"{n}.vectors"],
            column_energy=tensors[f"{n}.column_energy"],
            select=select,
            tokens=meta["tokens"],
            info=dict(meta["info"]),
        )
        for n, meta in extra.items()
    }


@register
class AstraCode(Astra):
    """Astra as released (LyoAI/Astra astra.py): head ("IPM") eigenvectors of the uncentred,
    per-forward max-scaled second moment, padding included, divided by the number of forwards."""

    name = "astra_code"
