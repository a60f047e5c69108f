"""Calibration statistics: closed forms on a single nn.Linear, block-wise = all-at-once, error paths."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from astra.stats import (
    NonFiniteActivationError,
    StatOptions,
    block_key,
    collect_group,
    layer_groups,
    stat_options,
    stream_covariances,
)


class Single(nn.Module):
    """A model that is one nn.Linear; batches are {"x": (B, T, d_in), "attention_mask": (B, T)}."""

    def __init__(self, d_in: int = 6, d_out: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x)


def make_batches(d_in: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Three batches of different shapes with right padding (sample lengths 4,2 | 3 | 5,1,3)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ((4, 2), (3,), (5, 1, 3)):
        width = max(lengths)
        x = torch.randn(len(lengths), width, d_in, generator=gen) * 3 + 0.5
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        batches.append({"x": x, "attention_mask": mask})
    return batches


def closed_form(model: Single, batches: list, o: StatOptions) -> torch.Tensor:
    """The covariance written out sample by sample in fp64, independently of the accumulator."""
    second, first, tokens, samples = 0.0, 0.0, 0, 0
    for batch in batches:
        for x, mask in zip(batch["x"], batch["attention_mask"], strict=True):
            with torch.no_grad():  # the layer's own fp32 output, then everything in fp64
                rows = (model.lin(x) if o.side == "output" else x).double()
            if o.mask_padding:
                rows = rows[mask.bool()]
            if o.sample_norm == "max_abs":
                rows = rows / rows.max().abs()
            second = second + rows.T @ rows
            first = first + rows.sum(0)
            tokens, samples = tokens + rows.shape[0], samples + 1
    scatter = second - (torch.outer(first, first) / tokens if o.centered else 0.0)
    return scatter / (tokens if o.normalizer == "tokens" else samples)


COMBOS = list(itertools.product(("output", "input"), (True, False), ("none", "max_abs"), (True, False),
                                ("tokens", "forwards"), ("fp32", "fp64")))  # fmt: skip


@pytest.mark.parametrize("side,centered,sample_norm,mask_padding,normalizer,accum", COMBOS)
def test_single_linear_closed_form(side, centered, sample_norm, mask_padding, normalizer, accum):
    o = StatOptions(side, centered, sample_norm, mask_padding, normalizer, accum)
    model, batches = Single(), make_batches()
    acc = collect_group(model, {"lin": model.lin}, batches, o)["lin"]
    expected = closed_form(model, batches, o)
    got = acc.covariance()
    assert got.dtype == (torch.float64 if accum == "fp64" else torch.float32)
    tol = 1e-10 if accum == "fp64" else 1e-5
    assert torch.allclose(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert acc.tokens == (
        sum(int(b["attention_mask"].sum()) for b in batches) if mask_padding else 2 * 4 + 3 + 3 * 5
    )
    assert acc.samples == 6


def test_accum_dtype_model_uses_model_dtype():
    model, batches = Single().to(torch.bfloat16), make_batches()
    batches = [{**b, "x": b["x"].to(torch.bfloat16)} for b in batches]
    acc = collect_group(model, {"lin": model.lin}, batches, StatOptions(accum_dtype="model"))["lin"]
    assert acc.covariance().dtype == torch.bfloat16


def test_sample_norm_is_abs_of_max_not_max_abs():
    """The release divides by abs(max(Y)): a sample whose max is 1 but whose min is -10 is not rescaled."""
    model = Single(2, 2)
    with torch.no_grad():
        model.lin.weight.copy_(torch.eye(2))
        model.lin.bias.zero_()
    x = torch.tensor([[[1.0, -10.0], [0.5, 0.0]]])
    batches = [{"x": x, "attention_mask": torch.ones(1, 2, dtype=torch.long)}]
    o = StatOptions(centered=False, sample_norm="max_abs", normalizer="forwards")
    cov = collect_group(model, {"lin": model.lin}, batches, o)["lin"].covariance()
    assert torch.allclose(cov, x[0].T @ x[0])


def test_hooks_removed_and_nonfinite_names_layer_and_batch():
    model, batches = Single(), make_batches()
    batches[1]["x"][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"'lin' at calibration batch 1"):
        collect_group(model, {"lin": model.lin}, batches, StatOptions())
    assert not model.lin._forward_hooks  # removed in `finally`
    assert model.training  # training mode restored


def test_mask_mismatch_is_a_clear_error():
    model, batches = Single(), make_batches()
    batches[0]["attention_mask"] = batches[0]["attention_mask"][:, :2]
    with pytest.raises(ValueError, match="mask_padding=false"):
        collect_group(model, {"lin": model.lin}, batches, StatOptions())


def test_invalid_options_name_valid_values():
    with pytest.raises(ValueError, match="none, max_abs"):
        StatOptions(sample_norm="max")
    with pytest.raises(ValueError, match="tokens, forwards"):
        StatOptions(normalizer="samples")
    with pytest.raises(ValueError, match="output_cov, input_cov"):
        stat_options({}, "grad")


def test_block_grouping():
    names = ["m.layer.0.q", "m.layer.0.k", "m.layer.1.q", "m.layer.10.q", "m.pooler"]
    assert block_key("m.layer.10.q") == "m.layer.10"
    assert layer_groups(names) == [
        ["m.layer.0.q", "m.layer.0.k"],
        ["m.layer.1.q"],
        ["m.layer.10.q"],
        ["m.pooler"],
    ]
    assert layer_groups(names, "all") == [names]


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24
    )
    return BertForSequenceClassification(cfg).eval()


def token_batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (2, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])})
    return out


@pytest.mark.parametrize("side", ["output_cov", "input_cov"])
def test_block_wise_equals_all_at_once(side):
    model, batches = tiny_bert(), token_batches()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in n}
    o = stat_options({}, side)
    blocks = {n: a.covariance() for n, a in stream_covariances(model, targets, batches, o, "block")}
    at_once = {n: a.covariance() for n, a in stream_covariances(model, targets, batches, o, "all")}
    assert blocks.keys() == at_once.keys() == targets.keys()
    for name in targets:
        assert torch.allclose(blocks[name], at_once[name], rtol=1e-6, atol=1e-7), name


def test_streaming_with_function_preserving_init_between_blocks():
    """The spine's path: init applied to block k before block k+1 is collected gives the statistics of
    the unmodified model (the init preserves every block's output)."""
    from peft import LoraConfig, get_peft_model

    from astra.adapters import apply_init, lora_layers
    from astra.astra_init import astra_init, layer_eigens

    model, batches = tiny_bert(), token_batches()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    peft_model = get_peft_model(model, config)
    layers = lora_layers(peft_model)
    reference = {
        n: a.covariance() for n, a in stream_covariances(peft_model, layers, batches, StatOptions(), "all")
    }
    streamed = {}
    for name, acc in stream_covariances(peft_model, layers, batches, StatOptions(), "block"):
        streamed[name] = cov = acc.covariance()
        layer = layers[name]
        eig = layer_eigens(cov, 4, "tail")
        apply_init(layer, astra_init(layer.get_base_layer().weight, eig, 4, layer.scaling["default"]))
    assert (layers[name].lora_B["default"].weight != 0).any()  # inits really were applied
    for name in layers:
        assert torch.allclose(streamed[name], reference[name], rtol=1e-4, atol=1e-6), name
