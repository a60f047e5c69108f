"""Model loading: embedded real models (integration) and random test models."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from astra.models import convert_gguf, load_model, model_config, package_dir

GLUE = OmegaConf.create({"family": "glue", "num_labels": 2})
NLG = OmegaConf.create({"family": "nlg"})


def test_random_models_are_seeded(tmp_path):
    a, tok, ident = load_model(model_config("tiny-bert"), GLUE, tmp_path, seed=3)
    b, _, _ = load_model(model_config("tiny-bert"), GLUE, tmp_path, seed=3)
    c, _, _ = load_model(model_config("tiny-bert"), GLUE, tmp_path, seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert "seed3" in ident and tok.pad_token is not None


def test_unknown_model_config_names_valid_ones():
    with pytest.raises(FileNotFoundError, match="minilm"):
        model_config("gpt-17")


@pytest.mark.integration
def test_minilm_sequence_classifier_offline(tmp_path):
    model, tok, _ = load_model(model_config("minilm"), GLUE, tmp_path)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert 22e6 < sum(p.numel() for p in model.parameters()) < 24e6
    logits = model(**tok(["a sentence", "another one"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)


@pytest.mark.integration
def test_smollm2_gguf_converted_once_and_generates():
    cfg = model_config("smollm2-135m")
    gguf = package_dir(cfg.path) / cfg.gguf_file
    cache = os.environ.get("ASTRA_CACHE_DIR", os.path.expanduser("~/.cache/astra"))
    first = convert_gguf(gguf, cache)
    mtime = (first / "config.json").stat().st_mtime_ns
    assert (
        convert_gguf(gguf, cache) == first and (first / "config.json").stat().st_mtime_ns == mtime
    )  # reused
    model, tok, _ = load_model(cfg, NLG, cache)
    assert model.config.model_type == "llama" and not getattr(model, "is_quantized", False)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok("Question: What is 2+3?\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1] :])
