"""Astra: eigen selection by projector equality, the pure init, function preservation, rank allocation."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from astra.astra_init import AstraMethodConfig, allocate_ranks, astra_factors
from astra.build import build_trainable
from astra.calib import calibration_batches
from astra.eigen import random_orthonormal
from astra.erank import release_effective_rank
from astra.methods import BuildContext, LayerSpec, get_method
from astra.stats import LayerStats
from tests.conftest import requires_data

CACHE = os.environ.get("ASTRA_CACHE_DIR", str(Path.home() / ".cache" / "astra"))


def known_spectrum(d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C (d, d), Q (d, d), lambda (d,) ascending and well separated) with C = Q diag(lambda) Q^T."""
    q = random_orthonormal(d, d, seed, torch.float64)
    lam = torch.linspace(0.1, 5.0, d, dtype=torch.float64) ** 2
    return (q * lam) @ q.T, q, lam


def spectrum_energy(values: torch.Tensor, r: int, select: str) -> float:
    """Fraction of trace(C) in the r selected eigen-directions (head/tail/middle) from the spectrum alone."""
    d = values.numel()
    idx = {"head": slice(d - r, d), "tail": slice(0, r), "middle": slice(d // 2, d // 2 + r)}[select]
    return float(values[idx].double().sum() / values.double().sum())


def projector(v: torch.Tensor) -> torch.Tensor:
    return v @ v.T


def astra_layer(cov: torch.Tensor, weight: torch.Tensor, rank: int, name: str = "layer", **options):
    """(init, reduced) of method=astra on one layer whose output covariance is `cov` (d_out, d_out)."""
    method, m = get_method("astra"), AstraMethodConfig(**options)
    stats = LayerStats(name=name, kind="output_cov", matrix=cov, tokens=10**6, samples=1)
    reduced = method.reduce(stats, m)
    return method.init(weight, reduced, LayerSpec(name=name, rank=rank, scaling=2.0, method=m)), reduced


@pytest.mark.parametrize("select", ["tail", "head", "middle"])
@pytest.mark.parametrize("eig_dtype", ["fp32", "fp64"])
def test_selection_projector_equals_expected_eigenvectors(select, eig_dtype):
    cov, q, lam = known_spectrum()
    d, r = 12, 3
    expected = {"tail": q[:, :r], "head": q[:, d - r :], "middle": q[:, d // 2 : d // 2 + r]}[select]
    cov = cov.float() if eig_dtype == "fp32" else cov
    init, reduced = astra_layer(
        cov, torch.randn(d, 7, dtype=cov.dtype), r, select=select, eig_dtype=eig_dtype
    )
    tol = 1e-5 if eig_dtype == "fp32" else 1e-12
    assert torch.allclose(projector(init.B.double()), projector(expected), atol=tol)
    assert torch.allclose(reduced.tensors["values"].double(), lam, rtol=tol, atol=tol)
    assert init.info["energy_fraction"] == pytest.approx(spectrum_energy(lam, r, select), rel=1e-5)


def test_projector_test_can_fail():
    """The neighbouring eigenvector set gives a different projector: the check above is not vacuous."""
    _, q, _ = known_spectrum()
    assert (projector(q[:, :3]) - projector(q[:, 1:4])).abs().max() > 0.1


def test_reduced_is_rank_and_selection_independent():
    """One reduction serves every rank and selection: what the content cache relies on."""
    cov, q, _ = known_spectrum()
    _, reduced = astra_layer(cov, torch.randn(12, 5, dtype=torch.float64), 1, eig_dtype="fp64")
    method = get_method("astra")
    for select, r in [("tail", 2), ("head", 5), ("middle", 3)]:
        m = AstraMethodConfig(select=select, eig_dtype="fp64")
        init = method.init(torch.randn(12, 5, dtype=torch.float64), reduced, LayerSpec("layer", r, 1.0, m))
        expected = {"tail": q[:, :r], "head": q[:, 12 - r :], "middle": q[:, 6 : 6 + r]}[select]
        assert torch.allclose(projector(init.B), projector(expected), atol=1e-9)


def test_range_only_eigenvectors_give_the_same_init_as_all_of_them():
    """d_out > d_in + 1: C = W_aug P W_aug^T has a null space; the reduction keeps the range eigenvectors only.
    Selections within the range give exactly the factors of the full eigenbasis; a tail selection is an
    orthonormal basis of (part of) the null space of W_aug^T (degenerate eigenvalue 0: any basis is one)."""
    from astra.eigen import decompose
    from astra.methods import Reduced

    g = torch.Generator().manual_seed(0)
    w_aug = torch.randn(12, 5, generator=g, dtype=torch.float64)  # [W | b], d_in = 4
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    moment = x.T @ x / 40
    stats = LayerStats(name="gate", kind="output_cov", matrix=w_aug @ moment @ w_aug.T, tokens=40, samples=4,
                       input_moment=moment, weight_aug=w_aug)  # fmt: skip
    method = get_method("astra")
    reduced = method.reduce(stats, AstraMethodConfig(eig_dtype="fp64"))
    full = decompose(stats, "fp64")
    assert reduced.tensors["vectors"].shape == (12, 5) and full.vectors.shape == (12, 12)
    whole = Reduced(tensors={"values": full.values, "vectors": full.vectors}, meta=reduced.meta)
    weight = w_aug[:, :4].contiguous()
    for select, r in [("head", 3), ("head", 5), ("random", 3)]:
        spec = LayerSpec("gate", r, 2.0, AstraMethodConfig(select=select, eig_dtype="fp64"))
        a, b = method.init(weight, reduced, spec), method.init(weight, whole, spec)
        assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A), (select, r)
        assert a.info["energy_fraction"] == pytest.approx(b.info["energy_fraction"], abs=1e-12)
    for r in (3, 7):  # within the null space, and all of it
        spec = LayerSpec("gate", r, 2.0, AstraMethodConfig(select="tail", eig_dtype="fp64"))
        a, b = method.init(weight, reduced, spec), method.init(weight, whole, spec)
        assert torch.allclose(a.B.T @ a.B, torch.eye(r, dtype=torch.float64), atol=1e-12)
        assert (w_aug.T @ a.B).abs().max() < 1e-10 and a.A.abs().max() < 1e-10  # V^T W = 0
        assert a.info["energy_fraction"] == pytest.approx(0.0, abs=1e-12)
        if r == 7:  # the whole null space: the same subspace as decompose's basis
            assert torch.allclose(projector(a.B), projector(b.B), atol=1e-10)
    spec = LayerSpec(
        "gate", 9, 2.0, AstraMethodConfig(select="tail", eig_dtype="fp64")
    )  # null space + 2 range
    a, b = method.init(weight, reduced, spec), method.init(weight, whole, spec)
    assert torch.allclose(projector(a.B), projector(b.B), atol=1e-10)


def test_random_select_is_seeded_orthonormal_control():
    cov, _, _ = known_spectrum()
    w = torch.randn(12, 5, dtype=torch.float64)
    a, _ = astra_layer(cov, w, 4, select="random", eig_dtype="fp64", select_seed=7)
    b, _ = astra_layer(cov, w, 4, select="random", eig_dtype="fp64", select_seed=7)
    c, _ = astra_layer(cov, w, 4, select="random", eig_dtype="fp64", select_seed=8)
    assert torch.equal(a.B, b.B) and not torch.allclose(a.B, c.B)
    assert torch.allclose(a.B.T @ a.B, torch.eye(4, dtype=torch.float64), atol=1e-12)
    energy = float(torch.trace(a.B.T @ cov @ a.B) / torch.trace(cov))
    assert a.info["energy_fraction"] == pytest.approx(energy, rel=1e-9)


def test_bad_choices_fail_at_compose_time_naming_valid_values(compose):
    from tests.test_baselines import chain_text

    with pytest.raises(Exception) as err:
        compose(["method=astra", "method.select=tial"])
    assert "expected one of [tail, head, middle, random]" in chain_text(err.value)
    with pytest.raises(ValueError, match="rank 13 exceeds d_out=12"):
        astra_layer(known_spectrum()[0], torch.randn(12, 5, dtype=torch.float64), 13)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_factors_reconstruct_weight(dtype, tol):
    torch.manual_seed(0)
    w = torch.randn(10, 6).to(dtype)
    v = random_orthonormal(10, 3, 1)
    A, B, res = astra_factors(w, v, scaling=16 / 3)
    assert A.dtype == B.dtype == res.dtype == dtype
    assert torch.allclose(B.float(), v, atol=tol) and torch.allclose(A.float(), v.T @ w.float(), atol=tol * 4)
    rebuilt = res.float() + 16 / 3 * B.float() @ A.float()
    # bf16: W_res is rounded once to bf16 (8-bit mantissa), so the error is ~2^-8 of |W_res|
    assert (rebuilt - w.float()).abs().max() <= tol * float(res.float().abs().max())


def test_effective_rank_and_allocation_budget():
    assert release_effective_rank(torch.ones(8)) == pytest.approx(8.0, rel=1e-5)
    assert release_effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0, rel=1e-4)
    scores = {"a": 1.0, "b": 30.0, "c": 5.0, "d": 60.0}
    ranks = allocate_ranks(scores, base_rank=8)
    assert sum(ranks.values()) == 32 and ranks["d"] > ranks["c"] > ranks["a"] >= 1
    capped = allocate_ranks(scores, base_rank=8, max_rank={"a": 16, "b": 9, "c": 16, "d": 9})
    assert sum(capped.values()) == 32 and capped["b"] <= 9 and capped["d"] <= 9


# --- whole models -----------------------------------------------------------------------------


def build(compose, tmp_path, overrides=(), dtype="float32", task_family="glue"):
    """(base model, Astra-initialised PEFT model, report, probe batch) for tiny-bert/glue or tiny-llama/causal."""
    from astra.data import build_task
    from astra.models import load_model
    from astra.pipeline import build_context

    model_name = "tiny-bert" if task_family == "glue" else "tiny-llama"
    cfg = compose([f"model={model_name}", "task=glue/mrpc", "method=astra", "calib.n=16", "calib.seq_len=48",
                   f"paths.cache_dir={tmp_path / 'cache'}", f"model.dtype={dtype}", *overrides])  # fmt: skip
    if task_family == "glue":
        model, tok, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=cfg.seed)
        task = build_task(cfg.task, tok, cfg.paths.data_dir)
        ctx = build_context(cfg, task, model_id)
        probe = calibration_batches(task, OmegaConf.merge(cfg.calib, {"n": 8, "batch_size": 8, "seed": 1}))[0]
    else:
        from tests.test_calib import FakeCausalTask

        model, tok, model_id = load_model(cfg.model, SimpleNamespace(family="nlg"), CACHE, seed=0)
        task = FakeCausalTask(tok, n=40)
        calib = cfg.calib
        ctx = BuildContext(cfg=cfg, calib_batches=lambda: calibration_batches(task, calib), task_type="CAUSAL_LM",
                           cache_dir=cfg.paths.cache_dir, model_id=model_id)  # fmt: skip
        probe = calibration_batches(task, OmegaConf.merge(cfg.calib, {"n": 8, "batch_size": 8, "seed": 1}))[0]
    probe = {k: v for k, v in probe.items() if k != "labels"}
    model.eval()  # no dropout: logits are compared exactly
    with torch.no_grad():
        base_logits = model(**probe).logits.float()
    peft_model, report = build_trainable(model, get_method(cfg.method.name), ctx)
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(**probe).logits.float()
    return peft_model, report, base_logits, logits


@requires_data
@pytest.mark.parametrize(
    "method,select", [("astra", "tail"), ("astra", "head"), ("astra", "random"), ("astra_code", "head")]
)
def test_function_preserved_tiny_bert_fp32(compose, tmp_path, method, select):
    _, report, base, init = build(compose, tmp_path, [f"method={method}", f"method.select={select}"])
    assert (init - base).abs().max() < 1e-4
    assert len(report.layers) == 12 and report.extra["calib_samples"] == 16
    info = next(iter(report.layers.values()))
    assert {"condition_number", "energy_fraction", "rank", "boundary", "tokens"} <= set(info)


@pytest.mark.parametrize("method", ["astra", "astra_code"])
def test_function_preserved_tiny_llama_fp32(compose, tmp_path, method):
    model, report, base, init = build(compose, tmp_path, [f"method={method}"], task_family="causal")
    assert (init - base).abs().max() < 1e-4
    assert len(report.layers) == 14
    layer = next(iter(report.layers))
    assert "layers.0" in layer


@requires_data
def test_function_preserved_bf16_documented_tolerance(compose, tmp_path):
    """bf16: W_res, A, B are rounded to bf16 (8-bit mantissa); logits agree to ~1e-2 absolute on the
    tiny model, which is the bf16 rounding of the base model's own forward (docs/astra.md)."""
    _, _, base, init = build(compose, tmp_path, dtype="bfloat16")
    assert (init - base).abs().max() < 3e-2


@requires_data
def test_effective_rank_allocation_end_to_end(compose, tmp_path):
    model, report, base, init = build(
        compose, tmp_path, ["method.rank_allocation=effective_rank", "method.rank=4"]
    )
    from peft.tuners.lora import LoraLayer

    ranks = {
        name: layer.r["default"] for name, layer in model.named_modules() if isinstance(layer, LoraLayer)
    }
    allocated = report.extra["rank_allocation"]
    assert sum(ranks.values()) == 4 * len(ranks) == sum(allocated.values())
    assert sorted(ranks.values()) == sorted(allocated.values()) and len(set(ranks.values())) > 1
    assert (init - base).abs().max() < 1e-4


@requires_data
def test_dropout_and_bad_options_are_clear_errors(compose, tmp_path):
    with pytest.raises(ValueError, match="lora_dropout = 0"):
        build(compose, tmp_path, ["method.dropout=0.1"])
    with pytest.raises(ValueError, match="computes the rank pattern"):
        build(compose, tmp_path, ["method.rank_allocation=effective_rank", "+method.rank_pattern.query=2"])


@requires_data
def test_rank_deficient_calibration_warns_with_numbers(compose, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(compose, tmp_path, ["calib.n=1", "calib.seq_len=8"])  # <= 8 tokens < d_out = 32
    messages = [str(w.message) for w in caught if "rank-deficient" in str(w.message)]
    assert messages and "tokens < d_out = " in messages[0]


class Single(nn.Module):
    """One linear layer on given activations `x` (batch, seq, d_in)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("method,expected", [("astra", (1.0, 2.0)), ("astra_code", (1.0, 0.0))])
def test_docs_worked_example(method, expected):
    """docs/astra.md: Y = [[2, 0], [0, 1], [-2, 0] (padding)], W = I; tail (1, 2)/sqrt(5) vs head (1, 0)."""
    from astra.pipeline import compose_config
    from astra.stats import collect_statistics

    m = compose_config([f"method={method}"]).method
    astra = get_method(method)
    model = Single(2, 2)
    with torch.no_grad():
        model.lin.weight.copy_(torch.eye(2))
        model.lin.bias.zero_()
    batch = {
        "x": torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-2.0, 0.0]]]),
        "attention_mask": torch.tensor([[1, 1, 0]]),
    }
    stats = dict(collect_statistics(model, {"lin": model.lin}, "output_cov", [batch], astra.stat_options(m)))[
        "lin"
    ]
    ref = [[1.0, -0.5], [-0.5, 0.25]] if method == "astra" else [[2.0, 0.0], [0.0, 0.25]]
    assert torch.allclose(stats.matrix, torch.tensor(ref))
    init = astra.init(model.lin.weight, stats, LayerSpec("lin", 1, 1.0, m))
    v = torch.tensor(expected) / torch.tensor(expected).norm()
    assert torch.allclose(projector(init.B), projector(v[:, None]), atol=1e-6)


@pytest.mark.integration
@requires_data
def test_minilm_astra_preserves_function_and_logs_spectrum(compose, tmp_path):
    """The embedded all-MiniLM-L6-v2 (36 target layers, d_out up to 1536), 16 calibration samples."""
    from astra.data import build_task
    from astra.models import load_model
    from astra.pipeline import build_context

    cfg = compose(
        ["model=minilm", "task=glue/mrpc", "method=astra", "calib.n=16", f"paths.cache_dir={tmp_path}"]
    )
    model, tok, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=0)
    task = build_task(cfg.task, tok, cfg.paths.data_dir)
    probe = calibration_batches(task, OmegaConf.merge(cfg.calib, {"n": 8, "batch_size": 8, "seed": 1}))[0]
    probe = {k: v for k, v in probe.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        base = model.bert(**probe).last_hidden_state
    with pytest.warns(UserWarning, match="rank-deficient"):  # ~800 tokens < d_out = 1536 (intermediate)
        peft_model, report = build_trainable(model, get_method("astra"), build_context(cfg, task, model_id))
    peft_model.eval()
    with torch.no_grad():
        init = peft_model.base_model.model.bert(**probe).last_hidden_state
    assert (init - base).abs().max() < 1e-4
    assert len(report.layers) == 36
    deficient = [n for n, i in report.layers.items() if i.get("rank_deficient")]
    assert deficient and all("intermediate" in n for n in deficient)
