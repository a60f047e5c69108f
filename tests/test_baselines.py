"""Baselines: each init pinned to its paper's formula on random matrices, function preservation and
trainable-parameter counts on tiny random models, and every method end to end on tiny-bert (GLUE MRPC)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import calib_cov_distribution
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from astra.build import build_trainable
from astra.methods import BuildContext, LayerSpec, get_method, registered_methods
from astra.models import random_config
from astra.stats import collect_statistics, stat_options
from baselines.corda import CorDAMethodConfig
from baselines.eva import EVAMethodConfig, eva_config, eva_model
from baselines.lora import LoRAConfig
from baselines.lora_ga import LoraGAMethodConfig
from baselines.pissa import PiSSAConfig
from tests.conftest import requires_data

# from the registry: a new method is tested without editing this file (Astra's presets: tests/test_astra_init.py)
ALL_METHODS = [m for m in registered_methods() if not m.startswith("astra")]
ADAPTERS = [m for m in ALL_METHODS if get_method(m).trains_adapters]
RANK, ALPHA = 4, 8.0
SCALING = ALPHA / RANK


def proj(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column space of M (d, k) (double precision)."""
    Q, _ = torch.linalg.qr(M.double())
    return Q @ Q.T


def spectral_matrix(d_out: int, d_in: int, seed: int = 0, gap: float = 1.0) -> tuple[torch.Tensor, ...]:
    """W = U diag(S) V^T with distinct, well separated singular values: (W, U, S, V).

    `gap` < 1 shrinks every singular value after the r-th (randomised SVDs converge like gap^(2 niter))."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    k = min(d_out, d_in)
    S = 2.0 * 0.8 ** torch.arange(k, dtype=torch.float64)
    S[RANK:] *= gap
    W = U[:, :k] @ torch.diag(S) @ V[:, :k].T
    return W.float(), U[:, :k], S, V[:, :k]


def spec(method_cfg: object, rank: int = RANK, scaling: float = SCALING) -> LayerSpec:
    return LayerSpec(name="layer", rank=rank, scaling=scaling, method=method_cfg)


def chain_text(err: BaseException | None) -> str:
    """Messages of an exception and its causes (Hydra wraps OmegaConf's validation error)."""
    text = ""
    while err is not None:
        text, err = text + str(err) + "\n", err.__cause__ or err.__context__
    return text


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0)


# --- per-layer formulas on random matrices ------------------------------------------------------------


@pytest.mark.parametrize("niter", [0, 4])
def test_pissa_is_top_r_singular_triplets_with_residual_removed(niter: int) -> None:
    W, U, S, V = spectral_matrix(24, 16, gap=1.0 if niter == 0 else 0.1)
    init = get_method("pissa").init(W, None, spec(PiSSAConfig(name="pissa", niter=niter)))
    atol = 1e-4 if niter == 0 else 1e-3  # the fast SVD is iterative
    assert_close(proj(init.B), proj(U[:, :RANK]), atol)
    assert_close(proj(init.A.T), proj(V[:, :RANK]), atol)
    principal = U[:, :RANK] @ torch.diag(S[:RANK]) @ V[:, :RANK].T
    assert_close(SCALING * init.B @ init.A, principal, atol)
    assert_close(init.residual, W.double() - principal, atol)


def test_milora_is_bottom_r_singular_triplets_with_residual_removed() -> None:
    W, U, S, V = spectral_matrix(24, 16)
    init = get_method("milora").init(W, None, spec(SimpleNamespace(name="milora")))
    minor = U[:, -RANK:] @ torch.diag(S[-RANK:]) @ V[:, -RANK:].T
    assert_close(proj(init.B), proj(U[:, -RANK:]))
    assert_close(proj(init.A.T), proj(V[:, -RANK:]))
    assert_close(SCALING * init.B @ init.A, minor)
    assert_close(init.residual, W.double() - minor)
    # A and B share the scale sqrt(S_m / s) (PiSSA's convention): equal column / row norms
    assert_close(init.B.norm(dim=0), init.A.norm(dim=1))


def test_milora_rejects_a_rank_above_the_matrix_rank() -> None:
    with pytest.raises(ValueError, match="MiLoRA rank 20"):
        get_method("milora").init(torch.randn(8, 6), None, spec(None, rank=20))


def test_olora_is_the_qr_projection_with_residual_removed() -> None:
    W, *_ = spectral_matrix(24, 16)
    init = get_method("olora").init(W, None, spec(SimpleNamespace(name="olora")))
    assert_close(init.B.T @ init.B, torch.eye(RANK))  # orthonormal columns
    assert_close(proj(init.B), proj(W[:, :RANK]))  # span of W's first r columns
    assert_close(init.B @ init.A, proj(W[:, :RANK]) @ W.double())  # Q_r R_r = Q_r Q_r^T W
    assert_close(init.residual + SCALING * init.B @ init.A, W)


def lora_ga_spec(**kwargs: object) -> LayerSpec:
    return spec(LoraGAMethodConfig(name="lora_ga", **kwargs))


@pytest.mark.parametrize(
    ("direction", "a_cols", "b_cols"),
    [("ArB2r", slice(0, RANK), slice(RANK, 2 * RANK)), ("A2rBr", slice(RANK, 2 * RANK), slice(0, RANK)),
     ("ArBr", slice(1, 2 * RANK, 2), slice(0, 2 * RANK, 2))],
)  # fmt: skip
def test_lora_ga_paper_takes_the_gradient_singular_vector_slices(direction: str, a_cols, b_cols) -> None:
    W, *_ = spectral_matrix(24, 16, seed=1)
    G, U, _, V = spectral_matrix(24, 16, seed=2)  # a known gradient with distinct singular values
    init = get_method("lora_ga").init(W, G, lora_ga_spec(direction=direction))
    factor = 24**0.25 / 16**0.5  # stable scale: d_out^(1/4) / sqrt(gamma), gamma = 16
    assert_close(proj(init.A.T), proj(V[:, a_cols]))
    assert_close(proj(init.B), proj(U[:, b_cols]))
    assert_close(init.A.norm(dim=1), torch.full((RANK,), factor))  # no singular values in the paper's init
    assert_close(init.B.norm(dim=0), torch.full((RANK,), factor))
    assert_close(init.residual, W - SCALING * init.B @ init.A)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr"])
def test_lora_ga_rank_above_half_the_smaller_side_shifts_the_second_slice(direction: str) -> None:
    """2r > min(d_out, d_in) (r = 128 on a 192-row k/v): the second slice is the last r singular vectors."""
    W, *_ = spectral_matrix(24, 16, seed=1)
    G, U, _, V = spectral_matrix(24, 16, seed=2)
    r, k = 10, 16
    spec = LayerSpec(
        name="layer", rank=r, scaling=SCALING, method=LoraGAMethodConfig(name="lora_ga", direction=direction)
    )
    init = get_method("lora_ga").init(W, G, spec)
    first, second = slice(0, r), slice(k - r, k)
    a_cols, b_cols = (first, second) if direction == "ArB2r" else (second, first)
    assert_close(proj(init.A.T), proj(V[:, a_cols]))
    assert_close(proj(init.B), proj(U[:, b_cols]))
    assert init.info["slice_overlap"] == 2 * r - k
    assert_close(init.residual, W - SCALING * init.B @ init.A)
    with pytest.raises(ValueError, match="use direction ArB2r or A2rBr"):
        get_method("lora_ga").init(
            W, G, LayerSpec("layer", r, SCALING, LoraGAMethodConfig(name="lora_ga", direction="ArBr"))
        )


@pytest.mark.parametrize("scale", ["unit", "gd", "weight_svd"])
def test_lora_ga_paper_scales(scale: str) -> None:
    W, _, S_w, _ = spectral_matrix(24, 16, seed=1)
    G, *_ = spectral_matrix(24, 16, seed=2)
    init = get_method("lora_ga").init(W, G, lora_ga_spec(scale=scale))
    expected = {"unit": 1.0, "gd": 1 / SCALING, "weight_svd": float((S_w[:RANK] / SCALING).sqrt().mean())}[
        scale
    ]
    assert_close(init.A.norm(dim=1), torch.full((RANK,), expected))
    assert_close(init.B.norm(dim=0), torch.full((RANK,), expected))


def test_lora_ga_peft_formula_puts_singular_values_into_b() -> None:
    """PEFT 0.21's `lora_ga_init` (formula=peft) differs from the paper: B = U_slice diag(S_slice) * factor."""
    W, *_ = spectral_matrix(24, 16, seed=1)
    G, U, S, V = spectral_matrix(24, 16, seed=2)
    init = get_method("lora_ga").init(W, G, lora_ga_spec(formula="peft"))
    factor = 24**0.25 / 16**0.5
    assert_close(proj(init.A.T), proj(V[:, :RANK]), 1e-3)  # PEFT uses the randomised svd_lowrank
    assert_close(proj(init.B), proj(U[:, RANK : 2 * RANK]), 1e-3)
    assert_close(init.A.norm(dim=1), torch.ones(RANK), 1e-3)
    assert_close(init.B.norm(dim=0), S[RANK : 2 * RANK] * factor, 1e-3)
    assert_close(init.residual, W - SCALING * init.B @ init.A)


def test_lora_ga_rejects_unknown_options_at_compose_time_and_missing_gradients(compose) -> None:
    with pytest.raises(Exception) as err:
        compose(["method=lora_ga", "method.direction=BA"])
    assert "expected one of [ArB2r, A2rBr, ArBr, random]" in chain_text(err.value)
    with pytest.raises(ValueError, match="has no gradient"):
        get_method("lora_ga").init(torch.randn(8, 8), None, lora_ga_spec())


def random_covariance(d: int, seed: int = 3) -> torch.Tensor:
    X = torch.randn(200, d, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 2.0, d)
    return X.T @ X / 200


@pytest.mark.parametrize("corda_method", ["ipm", "kpm"])
def test_corda_is_the_covariance_weighted_svd(corda_method: str) -> None:
    W, *_ = spectral_matrix(24, 16)
    C = random_covariance(16)
    init = get_method("corda").init(W, C, spec(CorDAMethodConfig(name="corda", corda_method=corda_method)))
    C_d = C.double() + 0.01 * C.double().diag().mean() * torch.eye(16, dtype=torch.float64)  # PEFT's damping
    U, S, Vh = torch.linalg.svd(W.double() @ C_d)
    keep = slice(0, RANK) if corda_method == "ipm" else slice(16 - RANK, 16)
    expected = U[:, keep] @ torch.diag(S[keep]) @ Vh[keep] @ torch.linalg.inv(C_d)
    assert_close(SCALING * init.B @ init.A, expected)
    assert_close(proj(init.B), proj(U[:, keep]))
    assert_close(init.residual, W.double() - expected)


def test_corda_statistics_equal_peft_calib_cov_distribution() -> None:
    """astra.stats with CorDA's options == PEFT's port of the release hook (one unpadded sample a forward)."""
    torch.manual_seed(0)
    model = ToyLM(vocab=50, d_in=12, d_out=10)
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    batches = [
        {"input_ids": ids[:2], "attention_mask": mask[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]
    options = stat_options(CorDAMethodConfig(), "input_cov")
    ours = dict(collect_statistics(model, {"proj": model.proj}, "input_cov", batches, options))
    config = LoraConfig(r=2, target_modules=["proj"], corda_config=CordaConfig())
    samples = [ids[i : i + 1, : int(mask[i].sum())] for i in range(3)]
    calib_cov_distribution(model, config, lambda: [model(s) for s in samples], None, None)
    assert_close(ours["proj"].matrix, model.proj.covariance_matrix, 1e-6)


class ToyLM(nn.Module):
    """Embedding -> one linear `proj`: the layer's inputs are the token embeddings, known exactly."""

    def __init__(self, vocab: int, d_in: int, d_out: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        return self.proj(self.embed(input_ids))


def test_eva_a_spans_the_top_principal_directions_of_the_layer_inputs() -> None:
    torch.manual_seed(0)
    model = ToyLM(vocab=400, d_in=16, d_out=12)
    with torch.no_grad():  # embeddings with a clear spectral gap: 4 strong directions + small noise
        basis = torch.linalg.qr(torch.randn(16, 4))[0]
        model.embed.weight.copy_(torch.randn(400, 4) * torch.tensor([8.0, 6.0, 4.0, 3.0]) @ basis.T
                                 + 0.05 * torch.randn(400, 16))  # fmt: skip
    ids = torch.randperm(400)[:320].reshape(8, 40)
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0  # padding must not enter the decomposition
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, 8, 2)]
    cfg = EVAMethodConfig(name="eva")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights="eva",
                        eva_config=eva_config(cfg))  # fmt: skip
    peft_model = eva_model(model, config, batches)
    layer = peft_model.base_model.model.proj
    X = model.embed.weight[ids[mask.bool()]].double()  # (tokens, d_in), real tokens only
    X = X - X.mean(0)  # incremental PCA centres
    top = torch.linalg.eigh(X.T @ X).eigenvectors[:, -RANK:]
    assert_close(proj(layer.lora_A["default"].weight.T), proj(top), 1e-3)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_eva_fails_clearly_when_label_masking_leaves_too_few_tokens() -> None:
    model = ToyLM(vocab=50, d_in=16, d_out=12)
    ids = torch.randint(1, 50, (2, 10))
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    ]
    config = LoraConfig(r=RANK, target_modules=["proj"], init_lora_weights="eva",
                        eva_config=eva_config(EVAMethodConfig(name="eva")))  # fmt: skip
    with pytest.raises(ValueError, match="use_label_mask=false"):
        eva_model(model, config, batches)


def test_lora_init_option_names_peft_inits_and_dora_is_a_preset(compose) -> None:
    lora = get_method("lora")
    assert lora.peft_kwargs(LoRAConfig(name="lora", init="gaussian")) == {"init_lora_weights": "gaussian"}
    with pytest.raises(Exception) as err:
        compose(["method=lora", "method.init=xavier"])  # rejected when the config is composed
    assert "expected one of [kaiming, gaussian]" in chain_text(err.value)
    dora = compose(["method=dora"]).method
    assert type(get_method("dora")) is type(lora) and get_method("dora").peft_kwargs(dora)["use_dora"] is True


# --- whole models: function preserved, parameter counts ---------------------------------------------


def tiny_model(compose, model_name: str, task_type: str) -> tuple[nn.Module, object]:
    cfg = compose([f"model={model_name}"])
    torch.manual_seed(0)
    config = random_config(cfg.model, vocab_size=120, pad_token_id=0)
    if task_type == "SEQ_CLS":
        config.num_labels = 2
        return AutoModelForSequenceClassification.from_config(config), cfg
    return AutoModelForCausalLM.from_config(config), cfg


def calib(task_type: str, n: int = 4, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n // 2):
        ids = torch.randint(1, 120, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq - 3 :] = 0
        ids[1, seq - 3 :] = 0
        if task_type == "SEQ_CLS":
            labels = torch.randint(0, 2, (2,), generator=g)
        else:
            labels = ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def built(compose, model_name: str, task_type: str, method: str) -> tuple[nn.Module, nn.Module, list]:
    base, cfg = tiny_model(compose, model_name, task_type)
    cfg = compose([f"model={model_name}", f"method={method}", f"method.rank={RANK}", f"method.alpha={ALPHA}"])
    batches = calib(task_type)
    ctx = BuildContext(cfg=cfg, calib_batches=lambda: batches, task_type=task_type, model_id=model_name)
    model, _ = build_trainable(copy.deepcopy(base).eval(), get_method(method), ctx)
    return base.eval(), model.eval(), batches


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


MODELS = [("tiny-bert", "SEQ_CLS"), ("tiny-llama", "CAUSAL_LM")]


@pytest.mark.parametrize(("model_name", "task_type"), MODELS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_function_preserved_at_init(compose, model_name: str, task_type: str, method: str) -> None:
    if not get_method(method).preserves_function:
        pytest.skip(f"{method} does not claim to preserve the model at init")
    base, model, batches = built(compose, model_name, task_type, method)
    for batch in batches:
        assert_close(logits(model, batch), logits(base, batch), atol=1e-4)


@pytest.mark.parametrize(("model_name", "task_type"), MODELS)
def test_trainable_parameter_counts_equal_at_equal_rank(compose, model_name: str, task_type: str) -> None:
    counts = {m: trainable(built(compose, model_name, task_type, m)[1]) for m in ADAPTERS}
    base, cfg = tiny_model(compose, model_name, task_type)
    targets = tuple(cfg.model.target_modules)
    linears = [m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.endswith(targets)]
    lora = counts["lora"]
    assert lora > sum(RANK * (m.in_features + m.out_features) for m in linears) - 1  # (+ a classifier head)
    assert {m: c for m, c in counts.items() if m != "dora"} == {m: lora for m in ADAPTERS if m != "dora"}
    assert counts["dora"] == lora + sum(m.out_features for m in linears)  # DoRA's magnitude vectors


def test_lora_b_is_zero_and_pissa_moves_the_base_weight(compose) -> None:
    _, lora, _ = built(compose, "tiny-llama", "CAUSAL_LM", "lora")
    base, pissa, _ = built(compose, "tiny-llama", "CAUSAL_LM", "pissa")
    assert all(torch.count_nonzero(p) == 0 for n, p in lora.named_parameters() if "lora_B" in n)
    q_base = base.model.layers[0].self_attn.q_proj.weight
    q_res = pissa.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(q_base, q_res)


def test_lora_ga_uses_at_most_grad_batches(compose) -> None:
    base, cfg = tiny_model(compose, "tiny-bert", "SEQ_CLS")
    cfg = compose(["model=tiny-bert", "method=lora_ga", "method.grad_batches=1"])
    batches = calib("SEQ_CLS")
    ctx = BuildContext(cfg=cfg, calib_batches=lambda: batches, task_type="SEQ_CLS")
    _, report = build_trainable(base, get_method("lora_ga"), ctx)
    assert report.extra["calib_batches_used"] == 1 and len(report.layers) == 12


# --- end to end on tiny-bert + MRPC ---------------------------------------------------------------------


@requires_data
@pytest.mark.parametrize("method", ALL_METHODS)
def test_end_to_end_tiny_bert_mrpc(compose, method: str) -> None:
    from astra.pipeline import run_experiment

    cfg = compose(["model=tiny-bert", "task=glue/mrpc", f"method={method}", "trainer.max_steps=2",
                   "trainer.batch_size=4", "task.train_limit=32", "eval.limit=16", "calib.n=4"])  # fmt: skip
    result = run_experiment(cfg)
    info = result.train_info
    assert result.run_info.status == "success"
    assert info.step0_loss == pytest.approx(info.base_loss, abs=1e-4)  # function preserved on real text
    assert len(info.history) == 2 and "accuracy" in result.eval_info.metrics


@requires_data
@pytest.mark.parametrize("method", ALL_METHODS)
def test_end_to_end_tiny_llama_metamath(compose, method: str) -> None:
    from astra.pipeline import run_experiment

    cfg = compose(["model=tiny-llama", "task=metamath", f"method={method}", "trainer.max_steps=2",
                   "trainer.batch_size=2", "task.train_limit=8", "task.max_length=96", "eval.limit=1",
                   "task.max_new_tokens=4", "eval.max_new_tokens=4", "calib.n=4", "calib.seq_len=256"])  # fmt: skip
    result = run_experiment(cfg)
    info = result.train_info
    assert result.run_info.status == "success"
    assert info.step0_loss == pytest.approx(info.base_loss, abs=1e-4)
    assert len(info.history) == 2


@pytest.mark.parametrize(("model_name", "task_type"), MODELS)  # tiny-bert's linears have biases
def test_dora_forward_equals_pefts_in_value_and_gradient(compose, model_name: str, task_type: str) -> None:
    from peft.tuners.lora.variants import DoraLinearVariant

    from baselines.lora import DoraForward

    _, model, batches = built(compose, model_name, task_type, "dora")
    model.double().train()
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if any(k in name for k in ("lora_B", "lora_magnitude", "base_layer.bias")):  # away from the init
            p.data += 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
    layers = [m for m in model.modules() if hasattr(m, "lora_variant") and m.lora_variant]
    assert layers and all(type(m.lora_variant["default"]) is DoraForward for m in layers)

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(0)  # the models' own dropout (train mode) draws the same masks
        out = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum()
        loss.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours = loss_and_grads()
    for m in layers:
        m.lora_variant["default"] = DoraLinearVariant()
    peft = loss_and_grads()
    torch.testing.assert_close(ours[0], peft[0], rtol=1e-10, atol=1e-10)
    assert ours[1].keys() == peft[1].keys() and any("lora_magnitude" in n for n in ours[1])
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], peft[1][name], rtol=1e-9, atol=1e-10, msg=name)
