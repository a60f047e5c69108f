"""`astra_code` against the authors' release (LyoAI/Astra astra.py), re-implemented here verbatim.

The release's arithmetic (hook, normalisation, eigh, IPM crop, init, allocate_fn) is written out
below as the release writes it, and compared with what `method=astra_code` computes on identical
inputs in fp32: covariance relative error < 1e-5, chosen subspace = V[:, -r:] by projector.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from astra.astra_init import allocate_ranks
from astra.build import build_trainable
from astra.calib import calibration_batches
from astra.erank import release_effective_rank as our_release_effective_rank
from astra.methods import BuildContext, LayerSpec, get_method
from astra.stats import LayerStats, collect_statistics, stat_options
from tests.test_astra_init import CACHE
from tests.test_calib import FakeCausalTask

R = 4


# --- the release, verbatim arithmetic ----------------------------------------------------------


@torch.no_grad()
def release_covariances(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """calib_cov_distribution: forward hooks, output[0] / abs(max), output^T output, / sample_count."""
    modules = dict(model.named_modules())

    def hook(module, input, output):
        output = output[0].detach().squeeze(0).data
        output = output.float()
        output = output / torch.max(output).abs()
        if torch.isnan(output).any() or torch.isinf(output).any():
            raise ValueError("Invalid value found in output, please check your output data.")
        covariance = output.t().matmul(output)
        module.sample_count += 1
        module.covariance_matrix += covariance

    handles = []
    for name in names:
        modules[name].sample_count = 0
        modules[name].covariance_matrix = 0
        handles.append(modules[name].register_forward_hook(hook))
    model.eval()
    for batch in batches:  # MyRun in init_astra.py
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    out = {}
    for name in names:
        modules[name].covariance_matrix /= modules[name].sample_count
        out[name] = modules[name].covariance_matrix
        del modules[name].covariance_matrix, modules[name].sample_count
    return out


def release_init(weight: torch.Tensor, covariance: torch.Tensor, r: int, scaling: float):
    """collect_eigens_for_layer + crop_astra_eigens (IPM) + AstraLayer.astra_init."""
    S, V = torch.linalg.eigh(covariance.float())
    V = V[:, -r:]
    dtype = weight.dtype
    weight = weight.to(torch.float32)
    lora_A = (V.t() @ weight).contiguous().to(dtype)
    lora_B = V.contiguous().to(dtype)
    weight = weight.data - scaling * lora_B @ lora_A
    return lora_A, lora_B, weight.to(dtype), S


def release_allocate(effective_rank_scores, base_rank, min_rank=1, max_rank=None):
    """allocate_fn, verbatim."""
    if max_rank is None:
        max_rank = max(2 * base_rank, 256)
    normalized_scores = {layer: np.log(score + 1) for layer, score in effective_rank_scores.items()}
    total_score = sum(normalized_scores.values())
    total_budget = len(effective_rank_scores) * base_rank
    allocated_ranks = {}
    for layer, score in normalized_scores.items():
        rank = int(round(score / total_score * total_budget))
        rank = max(min_rank, min(rank, max_rank))
        allocated_ranks[layer] = rank
    current_total = sum(allocated_ranks.values())
    rank_diff = total_budget - current_total
    if rank_diff != 0:
        sorted_layers = sorted(allocated_ranks.items(), key=lambda x: normalized_scores[x[0]], reverse=True)
        for i in range(abs(rank_diff)):
            layer, rank = sorted_layers[i % len(sorted_layers)]
            if rank_diff > 0:
                if allocated_ranks[layer] < max_rank:
                    allocated_ranks[layer] += 1
            else:
                if allocated_ranks[layer] > min_rank:
                    allocated_ranks[layer] -= 1
    return allocated_ranks


def release_effective_rank(eigenvalues, epsilon=1e-8):
    """stable_effective_rank_fn, verbatim."""
    eigenvalues = eigenvalues.to(dtype=torch.float32)
    eigenvalues = torch.clamp(eigenvalues, min=epsilon)
    total_sum = eigenvalues.sum()
    phi_bar = eigenvalues / total_sum
    entropy = -torch.sum(phi_bar * torch.log(phi_bar + epsilon))
    return torch.exp(entropy).cpu().item()


# --- set-up: tiny-llama, release calibration (max_length padding with EOS, input_ids[:-1]) ---------


@pytest.fixture(scope="module")
def setup():
    from astra.models import load_model
    from astra.pipeline import compose_config

    cfg = compose_config(["model=tiny-llama", "method=astra_code", "calib=release", "calib.n=6", "calib.seq_len=24",
                          f"method.rank={R}", "method.alpha=8", "method.cache=false"])  # fmt: skip
    model, tok, model_id = load_model(cfg.model, SimpleNamespace(family="nlg"), CACHE, seed=0)
    task = FakeCausalTask(tok, n=30)
    batches = calibration_batches(task, cfg.calib)
    return cfg, model, task, batches, model_id


def targets_of(model: nn.Module) -> list[str]:
    keys = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in keys]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_release_calibration_batches(setup):
    cfg, _, task, batches, _ = setup
    assert all(b["input_ids"].shape == (1, 23) for b in batches)  # max_length 24, then [:-1]
    ex = [task.train_examples[i] for i in random.Random(42).sample(range(30), 6)]
    text = ex[0]["instruction"] + "\n### Response:" + ex[0]["output"]
    ids = task.tokenizer(text, truncation=True, max_length=24, padding="max_length")["input_ids"][:-1]
    assert batches[0]["input_ids"][0].tolist() == ids
    assert (batches[0]["attention_mask"] == 0).any()  # padding present, and the release keeps it


def test_covariance_equals_release_hook_arithmetic(setup):
    cfg, model, _, batches, _ = setup
    names = targets_of(model)
    reference = release_covariances(model, names, batches)
    options = stat_options(cfg.method, "output_cov")
    modules = dict(model.named_modules())
    ours = dict(collect_statistics(model, {n: modules[n] for n in names}, "output_cov", batches, options))
    assert len(names) == 14
    for name in names:
        assert rel_err(ours[name].matrix, reference[name]) < 1e-5, name
        assert ours[name].samples == len(batches)


def test_subspace_and_factors_equal_release(setup):
    cfg, model, _, batches, _ = setup
    names = targets_of(model)
    reference = release_covariances(model, names, batches)
    modules, method = dict(model.named_modules()), get_method("astra_code")
    for name in names:
        weight, scaling = modules[name].weight, 8 / R
        A_ref, B_ref, W_ref, S_ref = release_init(weight, reference[name], R, scaling)
        stats = LayerStats(
            name=name, kind="output_cov", matrix=reference[name], tokens=10**6, samples=len(batches)
        )
        reduced = method.reduce(stats, cfg.method)
        init = method.init(weight, reduced, LayerSpec(name=name, rank=R, scaling=scaling, method=cfg.method))
        assert torch.allclose(init.B @ init.B.T, B_ref @ B_ref.T, atol=1e-5), name  # projector onto V[:, -r:]
        assert torch.allclose(reduced.tensors["values"], S_ref)
        # identical inputs to eigh give identical eigenvectors, so the factors agree entry by entry
        assert torch.allclose(init.B, B_ref) and torch.allclose(init.A, A_ref, atol=1e-6)
        assert torch.allclose(init.residual, W_ref, atol=1e-6)
        # the allocation's score is the release's effective rank, bit for bit
        score = our_release_effective_rank(reduced.tensors["values"])
        assert score == pytest.approx(release_effective_rank(S_ref), rel=1e-6)


def test_built_model_uses_release_subspace(setup):
    """The whole `method=astra_code` build (config -> stats -> eigh -> PEFT) picks the release's V[:, -r:]."""
    cfg, model, task, batches, model_id = setup
    names = targets_of(model)
    reference = release_covariances(model, names, batches)
    expected = {n: torch.linalg.eigh(reference[n].float())[1][:, -R:] for n in names}
    ctx = BuildContext(cfg=cfg, calib_batches=lambda: batches, task_type="CAUSAL_LM", model_id=model_id)
    peft_model, _ = build_trainable(copy.deepcopy(model), get_method("astra_code"), ctx)
    for name, module in peft_model.named_modules():
        base = name.removeprefix("base_model.model.")
        if base in expected:
            b = module.lora_B["default"].weight
            assert torch.allclose(b @ b.T, expected[base] @ expected[base].T, atol=1e-5), name


def test_rank_allocation_equals_release():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 5 + trial
        scores = {f"l{i}": float(s) for i, s in enumerate(torch.rand(n, generator=gen) * 60 + 1)}
        assert allocate_ranks(scores, base_rank=8) == release_allocate(scores, 8)


def test_astra_code_preset_fields():
    from astra.pipeline import compose_config

    m = compose_config(["method=astra_code"]).method
    assert (m.select, m.centered, m.sample_norm, m.mask_padding, m.normalizer) == (
        "head",
        False,
        "max_abs",
        False,
        "forwards",
    )
    p = compose_config(["method=astra"]).method
    assert (p.select, p.centered, p.sample_norm, p.mask_padding, p.normalizer) == (
        "tail",
        True,
        "none",
        True,
        "tokens",
    )
    calib = compose_config(["calib=release"]).calib
    assert calib.format == "code_release" and calib.seed == 42
    assert calib.padding == "max_length" and calib.drop_last_token and calib.batch_size == 1
