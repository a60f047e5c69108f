"""The optimised generation path (merged adapters, token-length batches, early stop) changes no output."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from astra.evaluate.generation import (
    GenerationStats,
    cut_at_stop,
    generate,
    greedy_tokens,
    lean_greedy_applies,
    lora_layers,
    merged_adapters,
)
from astra.models import load_model, model_config

CACHE = os.environ.get("ASTRA_CACHE_DIR", str(Path.home() / ".cache" / "astra"))
PROMPTS = [
    "Short one.",
    "A much longer prompt that needs a lot more tokens than the first one does, by far",
    "Mid size prompt",
    "Question: what is two plus two?",
    "x",
]


@pytest.fixture(scope="module")
def tiny():
    """(LoRA-wrapped random tiny-llama with non-zero B, tokenizer)."""
    model, tokenizer, _ = load_model(
        model_config("tiny-llama"), SimpleNamespace(family="math"), CACHE, seed=0
    )
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 would make merging trivially exact
            torch.nn.init.normal_(p, std=0.5)
    return model.eval(), tokenizer


def reference_generate(model, tokenizer, prompts, max_new_tokens, stop=()):  # noqa: ANN001
    """The un-optimised path: one prompt at a time, unmerged adapters, no stop strings, cut afterwards."""
    out = []
    for text in prompts:
        batch = tokenizer(text, return_tensors="pt")
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        out.append([cut_at_stop(tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True),
                                stop)])  # fmt: skip
    return out


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_outputs_equal_the_unoptimised_path(tiny, batch_size: int, lean: bool):  # noqa: ANN001
    model, tok = tiny
    expected = reference_generate(model, tok, PROMPTS, max_new_tokens=12)
    stats = GenerationStats()
    got = generate(model, tok, PROMPTS, batch_size=batch_size, max_new_tokens=12, stats=stats, lean=lean)
    assert got == expected
    assert stats.n_sequences == len(PROMPTS) and stats.new_tokens > 0 and stats.seconds > 0


def test_stop_strings_cut_at_the_same_place(tiny):  # noqa: ANN001
    """Stopping generation early on a stop string gives the text the full generation cut there."""
    model, tok = tiny
    full = reference_generate(model, tok, PROMPTS, max_new_tokens=20)
    stop = tuple({c[0][3:6] for c in full if len(c[0]) > 6})  # strings that do occur in the outputs
    assert stop
    expected = [[cut_at_stop(c[0], stop)] for c in full]
    assert generate(model, tok, PROMPTS, batch_size=2, max_new_tokens=20, stop=stop) == expected


def test_lean_loop_is_taken_and_equals_generate_token_for_token(tiny, monkeypatch):  # noqa: ANN001
    """Left-padded batch, rows ending at different steps (EOS forced by a low id): same tokens as generate."""
    model, tok = tiny
    assert lean_greedy_applies(model)
    batch = tok.pad({"input_ids": tok(PROMPTS)["input_ids"]}, return_tensors="pt", padding_side="left")
    eos = int(greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 6, None, 0)[1, 3])  # occurs
    ref = model.generate(
        **batch, max_new_tokens=10, do_sample=False, top_k=None, pad_token_id=0, eos_token_id=eos
    )
    ours = greedy_tokens(model, batch["input_ids"], batch["attention_mask"], 10, eos, 0)
    assert torch.equal(ours, ref[:, batch["input_ids"].shape[1] :])
    calls = []
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: calls.append(1))
    generate(model, tok, PROMPTS[:2], max_new_tokens=3)
    assert calls == []


def test_models_with_logits_processors_keep_generate(tiny):  # noqa: ANN001
    model, _ = tiny
    model.generation_config.repetition_penalty = 1.3
    try:
        assert not lean_greedy_applies(model)
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_merging_changes_the_computation_but_not_the_function(tiny):  # noqa: ANN001
    model, tok = tiny
    batch = tok(PROMPTS[1], return_tensors="pt")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        plain = model(**batch).logits
        with merged_adapters(model):
            assert all(layer.merged for layer in lora_layers(model))
            base_w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
            assert not torch.equal(
                base_w, before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
            )
            merged = model(**batch).logits
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)
    assert not any(layer.merged for layer in lora_layers(model))
    for name, p in model.named_parameters():  # restored bit for bit, not W + dW - dW
        assert torch.equal(p, before[name]), name


def test_unmerged_model_is_left_alone():
    model, tok, _ = load_model(model_config("tiny-llama"), SimpleNamespace(family="math"), CACHE, seed=0)
    with merged_adapters(model) as same:
        assert same is model and lora_layers(model) == []
