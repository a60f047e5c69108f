"""Export round trip: residual + init adapter = the base model; trained adapter -> plain LoRA on the base."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from astra.export import convert_to_lora, load_init, save_init
from astra.init_cli import main, split_argv
from astra.models import load_model
from tests.conftest import requires_data
from tests.test_astra_init import CACHE, build


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def simulate_training(model, seed: int = 0) -> None:
    """Move every LoRA factor and trainable head copy (modules_to_save), as optimiser steps would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def check_round_trip_and_conversion(out, model_cls, fresh_base, batch) -> None:
    base_logits = logits(fresh_base(), batch)
    loaded = load_init(out, model_cls)
    assert (logits(loaded, batch) - base_logits).abs().max() < 1e-4  # function preserved after reload

    simulate_training(loaded)
    trained = logits(loaded, batch)
    assert (trained - base_logits).abs().max() > 1e-3  # the adapter really moved
    lora_dir = convert_to_lora(loaded, out / "lora", out / "init_adapter")
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 2 * 8
    plain = PeftModel.from_pretrained(fresh_base(), lora_dir)  # the ORIGINAL base weights
    assert (logits(plain, batch) - trained).abs().max() < 1e-4


@requires_data
def test_cli_export_tiny_bert(tmp_path):
    out = tmp_path / "init"
    main(["model=tiny-bert", "task=glue/mrpc", "method=astra", "calib.n=8", "calib.seq_len=32",
          f"paths.cache_dir={tmp_path / 'cache'}", f"output_dir={out}"])  # fmt: skip
    summary = json.loads((out / "astra_init.json").read_text())
    assert len(summary["layers"]) == 12 and summary["init_seconds"] > 0 and summary["calib_samples"] == 8
    assert "timings" in summary and summary["cache"] == "miss"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "residual")
    batch = dict(tok(["a short sentence", "and another, longer one here"], padding=True, return_tensors="pt"))
    from astra.pipeline import compose_config

    cfg = compose_config(["model=tiny-bert", "task=glue/mrpc"])
    fresh = lambda: load_model(cfg.model, cfg.task, CACHE, seed=cfg.seed)[0]  # noqa: E731 (same seeded model)
    check_round_trip_and_conversion(out, AutoModelForSequenceClassification, fresh, batch)


@pytest.mark.parametrize("method", ["astra", "astra_code"])
def test_export_tiny_llama(compose, tmp_path, method):
    peft_model, _, _, _ = build(compose, tmp_path, [f"method={method}"], task_family="causal")
    cfg = compose(["model=tiny-llama"])
    _, tok, _ = load_model(cfg.model, SimpleNamespace(family="nlg"), CACHE, seed=0)
    out = tmp_path / "init"
    save_init(peft_model, tok, out)
    batch = dict(tok(["Add 3 and 4.", "Hello there, world"], padding=True, return_tensors="pt"))
    fresh = lambda: load_model(cfg.model, SimpleNamespace(family="nlg"), CACHE, seed=0)[0]  # noqa: E731
    check_round_trip_and_conversion(out, AutoModelForCausalLM, fresh, batch)


def test_export_does_not_import_the_cli_module():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("astra/init_cli.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "astra.run" not in imported and "astra.build" in imported


def test_cli_arguments():
    assert split_argv(["model=x", "output_dir=/tmp/d"]) == ("/tmp/d", ["model=x"])
    with pytest.raises(SystemExit, match="output_dir=DIR is required"):
        split_argv(["model=x"])
    with pytest.raises(FileNotFoundError, match="astra-init"):
        load_init("/nonexistent/folder", AutoModelForCausalLM)
