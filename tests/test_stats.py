"""Statistics engine: closed forms on single layers, shared input moments = direct accumulation for every
option combination (fp64), the sequential engine = hooks on full forwards on tiny LLaMA/BERT, one pass
suffices, padding honoured, non-finite errors, gradients pinned against PEFT's preprocess_loraga."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from astra.stats import (
    HiddenStates,
    LayerStats,
    NonFiniteStatisticsError,
    StatKind,
    StatOptions,
    block_key,
    block_plan,
    capture_block_inputs,
    collect_group,
    collect_statistics,
    layer_groups,
    share_equal,
    stat_options,
    stream_covariances,
)


class Single(nn.Module):
    """A model that is one nn.Linear; batches are {"x": (B, T, d_in), "attention_mask": (B, T)}."""

    def __init__(self, d_in: int = 6, d_out: int = 5, seed: int = 0, bias: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x)


class Pair(nn.Module):
    """Two layers reading the same input (as q/k/v do): the shared-input route."""

    def __init__(self, d_in: int = 4, d_out: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(d_in, d_out), nn.Linear(d_in, d_out + 2, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.a(x).sum() + self.b(x).sum()


def make_batches(d_in: int = 6, seed: int = 1, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    """Three batches of different shapes with right padding (sample lengths 4,2 | 3 | 5,1,3)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ((4, 2), (3,), (5, 1, 3)):
        width = max(lengths)
        x = (torch.randn(len(lengths), width, d_in, generator=gen) * 3 + 0.5).to(dtype)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        batches.append({"x": x, "attention_mask": mask})
    return batches


def closed_form(layer: nn.Linear, batches: list, o: StatOptions) -> torch.Tensor:
    """The covariance written out sample by sample in fp64, independently of the accumulators."""
    second, first, tokens, samples = 0.0, 0.0, 0, 0
    for batch in batches:
        for x, mask in zip(batch["x"], batch["attention_mask"], strict=True):
            with torch.no_grad():  # the layer's own output, then everything in fp64
                rows = (layer(x) if o.side == "output" else x).double()
            if o.mask_padding:
                rows = rows[mask.bool()]
            if o.sample_norm == "max_abs":
                rows = rows / rows.max().abs()
            second = second + rows.T @ rows
            first = first + rows.sum(0)
            tokens, samples = tokens + rows.shape[0], samples + 1
    scatter = second - (torch.outer(first, first) / tokens if o.centered else 0.0)
    return scatter / (tokens if o.normalizer == "tokens" else samples)


OPTION_COMBOS = list(
    itertools.product((True, False), ("none", "max_abs"), (True, False), ("tokens", "forwards"))
)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("accum", ["fp32", "fp64"])
@pytest.mark.parametrize("centered,sample_norm,mask_padding,normalizer", OPTION_COMBOS)
def test_single_linear_closed_form(side, accum, centered, sample_norm, mask_padding, normalizer):
    """The former direct accumulator (kept for its callers) against the closed form."""
    o = StatOptions(side, centered, sample_norm, mask_padding, normalizer, accum)
    model, batches = Single(), make_batches()
    acc = collect_group(model, {"lin": model.lin}, batches, o)["lin"]
    got, expected = acc.covariance(), closed_form(model.lin, batches, o)
    assert got.dtype == (torch.float64 if accum == "fp64" else torch.float32)
    assert close(got, expected, 1e-10 if accum == "fp64" else 1e-5)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert acc.tokens == (real if mask_padding else 2 * 4 + 3 + 3 * 5) and acc.samples == 6


@pytest.mark.parametrize("shape", [(6, 5, True), (4, 9, True), (4, 9, False)])
@pytest.mark.parametrize("accumulate", ["auto", "direct"])
@pytest.mark.parametrize("centered,sample_norm,mask_padding,normalizer", OPTION_COMBOS)
def test_engine_closed_form_fp64(shape, accumulate, centered, sample_norm, mask_padding, normalizer):
    """collect_statistics on one layer (fp64 model) = the closed form; d_out > d_in+1 takes the shared
    input route under `auto`, and its input moment reproduces C = W_aug P W_aug^T."""
    d_in, d_out, bias = shape
    o = StatOptions("output", centered, sample_norm, mask_padding, normalizer, "fp64", accumulate)
    model, batches = Single(d_in, d_out, bias=bias).double(), make_batches(d_in, dtype=torch.float64)
    (name, stats), = list(collect_statistics(model, {"lin": model.lin}, "output_cov", batches, o))  # fmt: skip
    shared = accumulate == "auto" and (d_in + 1) ** 2 < d_out**2
    assert name == "lin" and stats.route == ("shared_input" if shared else "direct")
    assert close(stats.matrix, closed_form(model.lin, batches, o), 1e-11)
    if shared:
        W = stats.weight_aug
        assert torch.equal(W[:, :d_in], model.lin.weight) and stats.input_moment.shape == (d_in + 1, d_in + 1)
        assert close(W @ stats.input_moment @ W.T, stats.matrix, 1e-12)
    assert torch.isfinite(stats.matrix).all() and torch.equal(stats.matrix, stats.matrix.T)


@pytest.mark.parametrize("centered,sample_norm,mask_padding,normalizer", OPTION_COMBOS)
def test_group_sharing_one_input_fp64(centered, sample_norm, mask_padding, normalizer):
    """Two layers on one input: one shared moment (per-layer sample weights with max_abs) = closed form."""
    o = StatOptions("output", centered, sample_norm, mask_padding, normalizer, "fp64")
    model, batches = Pair().double(), make_batches(4, dtype=torch.float64)
    targets = {"a": model.a, "b": model.b}
    got = dict(collect_statistics(model, targets, "output_cov", batches, o))
    for name, layer in targets.items():
        assert got[name].route == "shared_input"
        assert close(got[name].matrix, closed_form(layer, batches, o), 1e-11), name
    inputs = dict(collect_statistics(model, targets, "input_cov", batches, o))
    assert inputs["a"].matrix is inputs["b"].matrix  # one input covariance per group
    o_in = StatOptions("input", centered, sample_norm, mask_padding, normalizer, "fp64")
    assert close(inputs["a"].matrix, closed_form(model.a, batches, o_in), 1e-11)


def test_accum_dtype_model_uses_model_dtype_and_direct_arithmetic():
    model, batches = Pair().to(torch.bfloat16), make_batches(4, dtype=torch.bfloat16)
    o = StatOptions(accum_dtype="model")
    got = dict(collect_statistics(model, {"a": model.a, "b": model.b}, "output_cov", batches, o))
    assert all(s.matrix.dtype == torch.bfloat16 and s.route == "direct" for s in got.values())
    acc = collect_group(model, {"a": model.a}, batches, o)["a"]  # the release's arithmetic, bit for bit
    assert torch.equal(acc.covariance(), got["a"].matrix)


def test_sample_norm_is_abs_of_max_not_max_abs():
    """The release divides by abs(max(Y)): a sample whose max is 1 but whose min is -10 is not rescaled."""
    model = Single(2, 2)
    with torch.no_grad():
        model.lin.weight.copy_(torch.eye(2))
        model.lin.bias.zero_()
    x = torch.tensor([[[1.0, -10.0], [0.5, 0.0]]])
    batches = [{"x": x, "attention_mask": torch.ones(1, 2, dtype=torch.long)}]
    o = StatOptions(centered=False, sample_norm="max_abs", normalizer="forwards")
    (_, stats), = list(collect_statistics(model, {"lin": model.lin}, "output_cov", batches, o))  # fmt: skip
    assert torch.allclose(stats.matrix, x[0].T @ x[0])


def test_nonfinite_names_layer_and_batch_and_hooks_are_removed():
    model, batches = Single(), make_batches()
    batches[1]["x"][0, 0, 0] = float("nan")
    model.train()
    for accumulate in ("auto", "direct"):
        with pytest.raises(NonFiniteStatisticsError, match=r"'lin' at calibration batch 1"):
            list(
                collect_statistics(
                    model, {"lin": model.lin}, "output_cov", batches, StatOptions(accumulate=accumulate)
                )
            )
    assert not model.lin._forward_hooks  # removed in `finally`
    assert model.training  # training mode restored


def test_zero_sample_max_is_nonfinite_error():
    model = Single(2, 2)
    with torch.no_grad():
        model.lin.weight.zero_()
        model.lin.bias.zero_()
    batches = make_batches(2)
    with pytest.raises(NonFiniteStatisticsError, match="'lin'"):
        list(
            collect_statistics(
                model, {"lin": model.lin}, "output_cov", batches, StatOptions(sample_norm="max_abs")
            )
        )


def test_mask_mismatch_is_a_clear_error():
    model, batches = Single(), make_batches()
    batches[0]["attention_mask"] = batches[0]["attention_mask"][:, :2]
    with pytest.raises(ValueError, match="mask_padding=false"):
        list(collect_statistics(model, {"lin": model.lin}, "output_cov", batches, StatOptions()))


def test_options():
    with pytest.raises(ValueError, match="none, max_abs"):
        StatOptions(sample_norm="max")
    with pytest.raises(ValueError, match="tokens, forwards"):
        StatOptions(normalizer="samples")
    with pytest.raises(ValueError, match="auto, direct"):
        StatOptions(accumulate="shared")
    with pytest.raises(ValueError, match="output_cov, input_cov, grad"):
        stat_options({}, "hessian")
    o = stat_options({"accumulate": "direct", "centered": False}, "input_cov")
    assert o.side == "input" and o.accumulate == "direct" and not o.centered
    assert "accumulate" not in o.as_dict()  # exact: not part of the content key
    assert list(StatKind) == ["none", "output_cov", "input_cov", "grad"]


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


# --------------------------------------------------------------------------------------------
# tiny transformer models
# --------------------------------------------------------------------------------------------


def tiny_bert(seed: int = 0, layers: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=24)  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=40)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def token_batches(
    n: int = 4, seed: int = 0, causal: bool = False, width: int = 7
) -> list[dict[str, torch.Tensor]]:
    """Batches of 2 with right padding in the second sample (calibration batch > 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (2, width), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        labels = ids.masked_fill(mask == 0, -100) if causal else torch.tensor([0, 1])
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def block_targets(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer" in n}


MODELS = {"bert": (tiny_bert, False), "llama": (tiny_llama, True)}


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("kind", ["output_cov", "input_cov"])
@pytest.mark.parametrize("centered,sample_norm,mask_padding,normalizer", OPTION_COMBOS)
def test_sequential_shared_equals_forward_direct_fp64(
    arch, kind, centered, sample_norm, mask_padding, normalizer
):
    make, causal = MODELS[arch]
    model, batches = make().double(), token_batches(causal=causal)
    targets = block_targets(model)
    o = StatOptions("output", centered, sample_norm, mask_padding, normalizer, "fp64")
    direct = StatOptions("output", centered, sample_norm, mask_padding, normalizer, "fp64", "direct")
    seq = dict(collect_statistics(model, targets, kind, batches, o, "sequential"))
    ref = dict(collect_statistics(model, targets, kind, batches, direct, "forward"))
    assert list(seq) == list(ref) == list(targets)  # model order
    assert any(s.route == "shared_input" for s in seq.values()) == (kind == "output_cov")
    for name in targets:
        assert close(seq[name].matrix, ref[name].matrix, 1e-10), name
        assert (seq[name].tokens, seq[name].samples) == (ref[name].tokens, ref[name].samples)


@pytest.mark.parametrize("arch", list(MODELS))
def test_sequential_fp32_close_to_fp64_direct(arch):
    make, causal = MODELS[arch]
    model, batches = make(), token_batches(causal=causal)
    targets = block_targets(model)
    seq = dict(collect_statistics(model, targets, "output_cov", batches, StatOptions()))
    ref64 = dict(collect_statistics(model.double(), targets, "output_cov", batches,
                                    StatOptions(accum_dtype="fp64", accumulate="direct"), "forward"))  # fmt: skip
    for name in targets:
        assert close(seq[name].matrix, ref64[name].matrix, 1e-4), name


@pytest.mark.parametrize("arch", list(MODELS))
def test_padding_is_honoured_in_batches(arch):
    """Padded batches of 2 give the statistics of the same samples unpadded at batch size 1."""
    make, causal = MODELS[arch]
    model = make().double()
    batches = token_batches(causal=causal)
    singles = []
    for b in batches:
        for i in range(2):
            n = int(b["attention_mask"][i].sum())
            singles.append({k: v[i : i + 1, :n] if v.dim() == 2 else v[i : i + 1] for k, v in b.items()})
    o = StatOptions(accum_dtype="fp64")
    targets = block_targets(model)
    padded = dict(collect_statistics(model, targets, "output_cov", batches, o))
    single = dict(collect_statistics(model, targets, "output_cov", singles, o))
    for name in targets:
        assert close(padded[name].matrix, single[name].matrix, 1e-10), name


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_hidden_states_give_identical_statistics(arch, offload, monkeypatch):
    """The hidden states kept in host memory or in a temporary file between blocks: bit-identical
    statistics, hidden states read back only one batch at a time, and the file closed at the end."""
    import astra.stats as stats_module

    make, causal = MODELS[arch]
    model, batches = make(), token_batches(causal=causal)
    batches[-1] = {k: v[:1] if v.dim() else v for k, v in batches[-1].items()}  # a smaller last batch
    targets = block_targets(model)
    kept = dict(collect_statistics(model, targets, "output_cov", batches, StatOptions()))
    stores = []
    monkeypatch.setattr(
        stats_module, "HiddenStates", lambda *a: stores.append(HiddenStates(*a)) or stores[-1]
    )
    moved = dict(collect_statistics(model, targets, "output_cov", batches, StatOptions(), offload=offload))
    assert list(moved) == list(kept)
    for name in targets:
        assert torch.equal(moved[name].matrix, kept[name].matrix), name
    (store,) = stores
    assert store.offload == offload and not store.items
    if offload == "disk":
        assert store.file.closed and store.end == sum(b["input_ids"].numel() for b in batches) * 16 * 4


def test_hidden_states_round_trip_every_dtype_through_disk():
    store = HiddenStates("disk", torch.device("cpu"))
    for b, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64]):
        t = torch.randn(2, 3, 5).to(dtype)
        store.put(b, t)
        store.put(b, t * 2)  # same size: rewritten in place
        assert torch.equal(store.get(b), t * 2) and store.get(b).dtype == dtype
    assert store.end == 30 * (4 + 2 + 2 + 8)
    store.close()
    with pytest.raises(ValueError, match="offload"):
        HiddenStates("gpu", torch.device("cpu"))


def test_captured_keyword_arguments_equal_across_batches_are_held_once():
    """LLaMA's position embeddings (cos, sin) of equal-length batches: one object, not one per batch."""
    model = tiny_llama()
    batches = [{"input_ids": torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(i))}
               for i in range(3)]  # fmt: skip
    plan = block_plan(model, block_targets(model))
    with torch.no_grad():
        captured = capture_block_inputs(model, plan.blocks[0], batches)
    cos_sin = [kwargs["position_embeddings"] for _, kwargs in captured]
    assert cos_sin[0] is cos_sin[1] is cos_sin[2]
    assert captured[0][0][0] is not captured[1][0][0]  # the hidden states are not shared
    previous, value = (torch.ones(2), torch.ones(2)), (torch.ones(2), torch.zeros(2))
    shared = share_equal(value, previous)
    assert shared[0] is previous[0] and shared[1] is value[1]  # shared where equal, element by element
    a = torch.ones(2)
    assert (
        share_equal(torch.ones(3), a) is not a and share_equal(torch.ones(2, dtype=torch.float64), a) is not a
    )


def test_consumer_writes_do_not_change_later_statistics():
    """One pass suffices: block k's outputs are taken before its statistics are yielded, so whatever the
    consumer writes into block k afterwards (here: zeroed weights, not even function-preserving) does not
    reach later blocks' statistics: they are those of the unmodified base model."""
    model, batches = tiny_llama(layers=3).double(), token_batches(causal=True)
    targets = block_targets(model)
    o = StatOptions(accum_dtype="fp64")
    reference = {n: s.matrix for n, s in collect_statistics(model, targets, "output_cov", batches, o)}
    got = {}
    for name, stats in collect_statistics(model, targets, "output_cov", batches, o):
        got[name] = stats.matrix
        with torch.no_grad():
            targets[name].weight.zero_()
    for name in targets:
        assert torch.equal(got[name], reference[name]), name


@pytest.mark.parametrize("engine", ["sequential", "forward"])
def test_grad_mode_and_train_mode_do_not_leak_into_the_consumer(engine):
    model, batches = tiny_llama(), token_batches(causal=True)
    model.train()
    stream = collect_statistics(model, block_targets(model), "output_cov", batches, StatOptions(), engine)
    for _ in stream:
        assert torch.is_grad_enabled()
        break
    stream.close()  # a consumer that stops early
    assert torch.is_grad_enabled() and model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_targets_outside_blocks_fall_back_to_a_full_forward(caplog):
    model, batches = tiny_bert().double(), token_batches()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}  # + pooler, classifier
    plan = block_plan(model, targets)
    assert plan.path == "bert.encoder.layer" and plan.outside == ["bert.pooler.dense", "classifier"]
    o = StatOptions(accum_dtype="fp64")
    with caplog.at_level(logging.INFO, logger="astra.stats"):
        seq = dict(collect_statistics(model, targets, "output_cov", batches, o))
    assert "outside the blocks" in caplog.text
    ref = dict(collect_statistics(model, targets, "output_cov", batches, o, "forward"))
    assert list(seq) == list(targets)
    for name in targets:
        assert close(seq[name].matrix, ref[name].matrix, 1e-10), name
    assert seq["classifier"].tokens == 8  # one row per sample (pooled), unmasked


def test_blocks_that_cannot_run_in_isolation_fall_back(caplog):
    model, batches = tiny_llama().double(), token_batches(causal=True)
    model.config.layer_types = ["sliding_attention", "full_attention"]  # per-block masks differ
    o = StatOptions(accum_dtype="fp64")
    with caplog.at_level(logging.INFO, logger="astra.stats"):
        got = dict(collect_statistics(model, block_targets(model), "output_cov", batches, o))
    assert "sequential engine unavailable" in caplog.text and len(got) == len(block_targets(model))


def test_nonfinite_weight_names_the_layer():
    model, batches = tiny_llama(), token_batches(causal=True)
    targets = block_targets(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    names = []
    with pytest.raises(NonFiniteStatisticsError, match=r"model\.layers\.1\.mlp\.up_proj"):
        for name, stats in collect_statistics(model, targets, "output_cov", batches, StatOptions()):
            assert torch.isfinite(stats.matrix).all()
            names.append(name)
    assert names and all(".layers.0." in n or "layers.1.self_attn" in n for n in names)


def test_legacy_stream_covariances_block_equals_all():
    model, batches = tiny_bert(), token_batches()
    targets = block_targets(model)
    o = stat_options({}, "output_cov")
    blocks = {n: a.covariance() for n, a in stream_covariances(model, targets, batches, o, "block")}
    at_once = {n: a.covariance() for n, a in stream_covariances(model, targets, batches, o, "all")}
    for name in targets:
        assert torch.allclose(blocks[name], at_once[name], rtol=1e-5, atol=1e-6), name


# --------------------------------------------------------------------------------------------
# gradients (LoRA-GA)
# --------------------------------------------------------------------------------------------


def peft_gradients(model, targets: list[str], batches) -> dict[str, torch.Tensor]:
    from peft import LoraConfig
    from peft.tuners.lora import LoraGAConfig, preprocess_loraga

    config = LoraConfig(
        r=2, target_modules=targets, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()
    )

    def train_step() -> None:
        model.eval()
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "_peft_loraga_grad"):
            out[name] = module._peft_loraga_grad.clone()
            del module._peft_loraga_grad
    return out


@pytest.mark.parametrize("arch", list(MODELS))
def test_gradients_equal_peft_preprocess_loraga(arch):
    make, causal = MODELS[arch]
    model, batches = make().double(), token_batches(causal=causal)
    targets = block_targets(model)
    ours = dict(collect_statistics(model, targets, "grad", batches, StatOptions()))
    assert all(p.grad is None for p in model.parameters())  # nothing left on the model
    assert all(p.requires_grad for p in model.parameters())  # requires_grad restored
    theirs = peft_gradients(model, ["query", "key", "value", "dense"] if arch == "bert" else
                            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], batches)  # fmt: skip
    theirs = {n: g for n, g in theirs.items() if n in targets}
    assert theirs.keys() == targets.keys()
    for name in targets:
        assert isinstance(ours[name], LayerStats) and ours[name].kind == "grad"
        assert ours[name].matrix.shape == targets[name].weight.shape
        assert close(ours[name].matrix, theirs[name], 1e-10), name
        assert float(theirs[name].abs().max()) > 0


@pytest.mark.parametrize("arch", list(MODELS))
def test_gradient_micro_batches_are_exact(arch):
    """Splitting a batch (memory) weights each micro-batch's mean loss by its share of the batch's labels."""
    make, causal = MODELS[arch]
    model, batches = make().double(), token_batches(causal=causal)
    targets = block_targets(model)
    whole = dict(collect_statistics(model, targets, "grad", batches, StatOptions()))
    split = dict(collect_statistics(model, targets, "grad", batches, StatOptions(grad_micro_batch=1)))
    for name in targets:
        assert close(split[name].matrix, whole[name].matrix, 1e-10), name


def test_gradients_need_labels():
    model, batches = tiny_llama(), token_batches(causal=True)
    batches[0].pop("labels")
    with pytest.raises(ValueError, match="labelled"):
        list(collect_statistics(model, block_targets(model), "grad", batches, StatOptions()))


def test_gradient_batches_without_labelled_tokens_are_left_out(caplog):
    """A batch whose labels are all -100 (a response cut by seq_len) has no loss: it is left out of the
    average (with a warning) instead of poisoning it with 0/0; with none left it is an error."""
    model, batches = tiny_llama().double(), token_batches(causal=True)
    targets = block_targets(model)
    reference = dict(collect_statistics(model, targets, "grad", batches[1:], StatOptions()))
    batches[0]["labels"] = torch.full_like(batches[0]["labels"], -100)
    with caplog.at_level(logging.WARNING, logger="astra.stats"):
        got = dict(collect_statistics(model, targets, "grad", batches, StatOptions()))
    assert "1 of 4 calibration batches have no labelled token" in caplog.text
    for name in targets:
        assert close(got[name].matrix, reference[name].matrix, 1e-12), name
    with pytest.raises(ValueError, match="no gradient calibration batch"):
        list(collect_statistics(model, targets, "grad", batches[:1], StatOptions()))


@pytest.mark.integration
@pytest.mark.parametrize("model_name", ["minilm", "smollm2-135m"])
def test_embedded_models_sequential_equals_forward(model_name):
    """The real embedded models (BERT: minilm; LLaMA: SmolLM2): the sequential engine with shared input
    moments gives the statistics of hooks on full forwards (fp32), calibration batch 2 with padding."""
    import os

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from astra.models import model_config, resolve_model_dir

    cfg = model_config(model_name)
    path = resolve_model_dir(cfg, os.environ["ASTRA_CACHE_DIR"])
    head = AutoModelForSequenceClassification if model_name == "minilm" else AutoModelForCausalLM
    model = head.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = ["The cat sat on the mat and looked at the garden.", "Eigenvectors of a covariance.",
             "def add(a, b):\n    return a + b", "Calibration tokens pass every block once."]  # fmt: skip
    batches = [dict(tokenizer(texts[i : i + 2], padding=True, return_tensors="pt")) for i in (0, 2)]
    assert any(int(b["attention_mask"].min()) == 0 for b in batches)  # really padded
    suffixes = tuple(cfg.target_modules)
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.endswith(suffixes) and re_block(n) in (0, 1)}  # fmt: skip
    seq = dict(collect_statistics(model, targets, "output_cov", batches, StatOptions()))
    ref = dict(
        collect_statistics(model, targets, "output_cov", batches, StatOptions(accumulate="direct"), "forward")
    )
    assert list(seq) == list(targets) and len(targets) >= 10
    assert any(s.route == "shared_input" for s in seq.values())
    for name in targets:
        assert close(seq[name].matrix, ref[name].matrix, 1e-4), name


def re_block(name: str) -> int | None:
    import re

    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None
