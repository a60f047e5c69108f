"""Spectral maths: the (d_in+1)-sized range solver equals eigh of the directly accumulated fp64 covariance
(projectors, values), its tail is the null space of W^T (A = V^T W = 0, reported and warned once), fp32
statistics keep the head within 1e-3 degrees and the tail energy within 1e-6 lambda_max, eigengaps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import astra.eigen as eigen
from astra.eigen import (
    boundary,
    candidate_columns,
    decompose,
    principal_angle_deg,
    random_orthonormal,
    select_columns,
)
from astra.stats import LayerStats, StatOptions, collect_statistics
from tests.test_stats import Single, make_batches, tiny_llama, token_batches


def close_matrix(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-11, atol=1e-11 * float(b.abs().max()))


def projector(v: torch.Tensor) -> torch.Tensor:
    return v.double() @ v.double().T


def wide_layer_stats(options: StatOptions, bias: bool = True) -> tuple[LayerStats, LayerStats, nn.Linear]:
    """(shared-route stats, direct fp64 stats) of one nn.Linear(4, 11) (d_out > d_in + 1), fp64 model."""
    model, batches = Single(4, 11, bias=bias).double(), make_batches(4, dtype=torch.float64)
    targets = {"lin": model.lin}
    (_, shared), = list(collect_statistics(model, targets, "output_cov", batches, options))  # fmt: skip
    direct_opts = StatOptions(**{**options.__dict__, "accumulate": "direct", "accum_dtype": "fp64"})
    (_, direct), = list(collect_statistics(model, targets, "output_cov", batches, direct_opts))  # fmt: skip
    return shared, direct, model.lin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("centered,sample_norm", [(True, "none"), (False, "max_abs"), (False, "none")])
def test_range_solver_equals_eigh_of_direct_fp64(bias, centered, sample_norm):
    o = StatOptions(centered=centered, sample_norm=sample_norm, accum_dtype="fp64")
    shared, direct, layer = wide_layer_stats(o, bias)
    assert shared.route == "shared_input" and shared.input_moment is not None
    ours = decompose(shared, "fp64")
    assert ours.info["solver"] == "range"
    assert callable(shared._matrix)  # the d_out^2 matrix was never formed
    assert close_matrix(shared.matrix, direct.matrix)  # ... and equals the direct one when read
    ref_values, ref_vectors = torch.linalg.eigh(direct.matrix)
    lam_max = float(ref_values[-1])
    assert torch.allclose(ours.values, ref_values, atol=1e-10 * lam_max)
    assert (ours.values[1:] >= ours.values[:-1]).all()  # ascending
    assert torch.allclose(ours.vectors.T @ ours.vectors, torch.eye(11, dtype=torch.float64), atol=1e-12)
    rank = int((ref_values > 1e-9 * lam_max).sum())
    null = 11 - rank
    assert ours.info["null_dim"] >= null and ours.info["tail_is_null_space"]
    for r in (1, 2, rank):  # head projectors (range eigenvectors; gaps are generic)
        assert torch.allclose(projector(ours.vectors[:, -r:]), projector(ref_vectors[:, -r:]), atol=1e-8), r
    lazy = decompose(shared, "fp64")  # head columns without the null-space block, equal to the full one's
    assert torch.equal(select_columns(lazy, 2, "head"), ours.vectors[:, -2:]) and lazy._vectors is None
    tail = select_columns(lazy, 3, "tail")  # Householder reflectors on 3 unit vectors, no (d, d) Q
    assert lazy._vectors is None and torch.allclose(tail, ours.vectors[:, :3], atol=1e-14)
    complete, _ = torch.linalg.qr(lazy.range_vectors, mode="complete")  # the documented complement
    assert torch.allclose(tail, complete[:, lazy.range_vectors.shape[1] :][:, :3], atol=1e-14)
    # the null space as a whole (its basis is arbitrary in both)
    assert torch.allclose(projector(ours.vectors[:, :null]), projector(ref_vectors[:, :null]), atol=1e-8)
    # tail there: A = V^T W = 0 (and V^T b = 0)
    W = layer.weight.detach()
    assert float((ours.vectors[:, :null].T @ W).abs().max()) < 1e-12 * float(W.abs().max())


def test_null_space_is_warned_once_with_numbers(monkeypatch):
    monkeypatch.setattr(eigen, "_warned_null_space", False)
    shared, _, _ = wide_layer_stats(StatOptions(accum_dtype="fp64"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decompose(shared, "fp64")
        decompose(shared, "fp64")
    messages = [str(w.message) for w in caught if "null space of W^T" in str(w.message)]
    assert len(messages) == 1 and "d_out=11" in messages[0]


def test_square_layer_uses_eigh():
    model, batches = Single(6, 5).double(), make_batches(6, dtype=torch.float64)
    (_, stats), = list(collect_statistics(model, {"lin": model.lin}, "output_cov", batches, StatOptions()))  # fmt: skip
    got = decompose(stats, "fp64")
    values, vectors = torch.linalg.eigh(stats.matrix.double())
    assert got.info["solver"] == "eigh" and not got.info["tail_is_null_space"]
    assert torch.equal(got.values, values) and torch.equal(got.vectors, vectors)
    assert torch.equal(decompose(stats.matrix, "fp64").values, values)  # a bare matrix works too
    with pytest.raises(ValueError, match="fp32, fp64"):
        decompose(stats, "fp16")


def test_fp32_statistics_head_angle_and_tail_energy_on_tiny_llama():
    """The acceptance criteria of the init: head within 1e-3 degrees of eigh(fp64 direct), tail energy
    tr(V^T C V) within 1e-6 lambda_max of the sum of the r smallest eigenvalues, for every layer."""
    model, batches = tiny_llama(), token_batches(n=8, causal=True, width=12)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    ours = dict(collect_statistics(model, targets, "output_cov", batches, StatOptions()))
    ref = dict(collect_statistics(model.double(), targets, "output_cov", batches,
                                  StatOptions(accum_dtype="fp64", accumulate="direct"), "forward"))  # fmt: skip
    assert any(
        s.route == "shared_input" and s.matrix.shape[0] > s.input_moment.shape[0] for s in ours.values()
    )
    r = 4
    for name in targets:
        e = decompose(ours[name], "fp32")
        C = ref[name].matrix
        values, vectors = torch.linalg.eigh(C)
        lam_max = float(values[-1])
        assert principal_angle_deg(e.vectors[:, -r:], vectors[:, -r:]) < 1e-3, name
        tail = e.vectors[:, :r].double()
        energy = float(torch.trace(tail.T @ C @ tail))
        assert abs(energy - float(values[:r].sum())) <= 1e-6 * lam_max, name


def test_boundary_gap_and_resolution_flag():
    stats = LayerStats("x", "output_cov", torch.diag(torch.tensor([1.0, 2.0, 3.0, 3.0 + 1e-9])), 1000, 10)
    e = decompose(stats, "fp64")
    assert e.info["resolution"] > 1e-9  # fp32 accumulation over 1000 tokens cannot resolve 1e-9
    one, two = boundary(e, 1, "head"), boundary(e, 2, "head")
    assert not one["resolved"] and two["resolved"] and two["gap"] == pytest.approx(1.0)
    assert boundary(e, 1, "tail")["gap"] == pytest.approx(1.0)
    assert boundary(e, 4, "tail")["gap"] is None


def test_an_fp32_eigensolve_cannot_resolve_what_fp64_statistics_can():
    C = torch.diag(torch.tensor([1.0, 2.0, 3.0, 3.0 + 3e-7], dtype=torch.float64))  # gap 1e-7 lambda_max
    stats = LayerStats("x", "output_cov", C, 100, 10)
    assert boundary(decompose(stats, "fp64"), 1, "head")["resolved"]
    assert not boundary(decompose(stats, "fp32"), 1, "head")["resolved"]


def test_principal_angle_of_known_rotation():
    theta = 1e-4  # degrees: tiny angles are accurate (computed through the sine)
    t = torch.deg2rad(torch.tensor(theta, dtype=torch.float64))
    a = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    b = torch.stack([torch.cos(t), torch.sin(t), torch.tensor(0.0, dtype=torch.float64)])[:, None]
    assert principal_angle_deg(a, b) == pytest.approx(theta, rel=1e-6)
    assert principal_angle_deg(a, torch.tensor([[0.0], [1.0], [0.0]])) == pytest.approx(90.0)


def test_candidate_columns_and_random_basis():
    vectors = torch.eye(6)
    assert torch.equal(candidate_columns(vectors, 2, "head"), vectors[:, 4:])
    assert torch.equal(candidate_columns(vectors, 2, "tail"), vectors[:, :2])
    assert torch.equal(candidate_columns(vectors, 2, "middle"), vectors[:, 3:5])
    q = random_orthonormal(6, 3, seed=1)
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-6) and torch.equal(
        q, random_orthonormal(6, 3, seed=1)
    )
    with pytest.raises(ValueError, match="tail, head, middle, random"):
        candidate_columns(vectors, 2, "tial")


def test_layers_reading_one_input_share_its_moment_and_factor(monkeypatch):
    """gate/up receive one P object; its eigh runs once for both, and each layer's eigenpairs are
    bit-identical to a decomposition from a private copy of P."""
    model, batches = tiny_llama(), token_batches(causal=True)
    mlp = model.model.layers[0].mlp
    targets = {"gate": mlp.gate_proj, "up": mlp.up_proj}
    stats = dict(collect_statistics(model, targets, "output_cov", batches, StatOptions()))
    assert stats["gate"].input_moment is stats["up"].input_moment
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.shape) or real_eigh(a))
    shared = {n: decompose(s) for n, s in stats.items()}
    assert calls.count(stats["gate"].input_moment.shape) == 1 + 2  # P once; F^T F per layer (same size)
    monkeypatch.undo()
    for name, s in stats.items():
        alone = LayerStats(
            name, s.kind, None, s.tokens, s.samples, s.input_moment.clone(), s.weight_aug, s.route
        )
        private = decompose(alone)
        assert torch.equal(private.values, shared[name].values) and torch.equal(
            private.range_vectors, shared[name].range_vectors
        ), name
    assert eigen._last_factor is not None
    del stats, s, alone, private  # the last P decomposed (a private copy) dies here
    assert eigen._last_factor is None  # the factor does not outlive its moment
