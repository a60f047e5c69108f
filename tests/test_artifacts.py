"""Verified cache folders (astra/artifacts.py) and the converted-model cache that uses them."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from astra import models
from astra.artifacts import MANIFEST, problem, verified_folder

FILES = ("config.json", "tokenizer.json")


def fake_build(calls: list[int] | None = None, delay: float = 0.0):
    """A tiny stand-in for a converted model: config, tokenizer, weights."""

    def build(tmp: Path) -> None:
        if calls is not None:
            calls.append(1)
        time.sleep(delay)
        (tmp / "config.json").write_text('{"model_type": "llama"}')
        (tmp / "tokenizer.json").write_text('{"version": "1.0"}')
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64)

    return build


def test_entry_is_built_once_sealed_and_reused(tmp_path):
    calls: list[int] = []
    target = tmp_path / "models" / "m"
    assert verified_folder(target, fake_build(calls), FILES) == target
    assert (target / MANIFEST).is_file() and problem(target, FILES) is None
    verified_folder(target, fake_build(calls), FILES)
    assert len(calls) == 1
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda t: (t / "model.safetensors").write_bytes(b"\0" * (256 * 64)), "sha256"),  # same size
        (lambda t: (t / "tokenizer.json").unlink(), "tokenizer.json"),
        (lambda t: (t / MANIFEST).unlink(), MANIFEST),  # an entry never sealed (killed writer, old cache)
    ],
    ids=["corrupted-weights", "missing-tokenizer", "unsealed"],
)
def test_damaged_entry_is_rebuilt_with_a_warning_naming_its_path(tmp_path, caplog, damage, why):
    calls: list[int] = []
    target = tmp_path / "m"
    verified_folder(target, fake_build(calls), FILES)
    damage(target)
    assert why in problem(target, FILES)
    with caplog.at_level(logging.WARNING, logger="astra.artifacts"):
        verified_folder(target, fake_build(calls), FILES)
    assert len(calls) == 2 and problem(target, FILES) is None
    assert str(target) in caplog.text and "rebuilding" in caplog.text


def test_missing_required_file_is_refused_at_seal_time(tmp_path):
    def no_tokenizer(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")

    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        verified_folder(tmp_path / "m", no_tokenizer, FILES)
    assert not (tmp_path / "m").exists()


def _writer(target: str, barrier) -> None:  # noqa: ANN001
    barrier.wait()
    verified_folder(Path(target), fake_build(delay=0.3), FILES)


def test_two_concurrent_writers_one_wins_the_other_uses_it(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    target = tmp_path / "models" / "m"
    procs = [ctx.Process(target=_writer, args=(str(target), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert problem(target, FILES) is None
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # the loser's temp folder is gone


def test_converted_model_cache_is_verified_and_rebuilt(tmp_path, monkeypatch, caplog):
    """convert_gguf goes through the verified folder: a corrupted conversion is redone, not used."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\1" * 1000)
    calls: list[int] = []
    import astra.artifacts as artifacts

    real = artifacts.verified_folder

    def fake(target, build, required, what):  # noqa: ANN001, ANN202 (no real GGUF here)
        return real(target, fake_build(calls), required, what)

    monkeypatch.setattr(artifacts, "verified_folder", fake)  # convert_gguf imports it at call time
    first = models.convert_gguf(gguf, tmp_path / "cache")
    assert (
        first.parent == tmp_path / "cache" / "models" and problem(first, models.CONVERTED_MODEL_FILES) is None
    )
    (first / "model.safetensors").write_bytes(b"\0" * (256 * 64))
    with caplog.at_level(logging.WARNING, logger="astra.artifacts"):
        assert models.convert_gguf(gguf, tmp_path / "cache") == first
    assert len(calls) == 2 and f"converted model {first}" in caplog.text


# --- trained runs saved for plain PEFT ------------------------------------------------------------------
LOAD_WITH_PLAIN_PEFT = """
import json, sys, torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
adapter, head, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base_path = PeftConfig.from_pretrained(adapter).base_model_name_or_path
cls = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
model = PeftModel.from_pretrained(cls.from_pretrained(base_path), adapter).eval()
with torch.no_grad():
    print(json.dumps(model(input_ids=torch.tensor(ids)).logits.tolist()))
"""


def trained_model_of(monkeypatch) -> dict:  # noqa: ANN001
    """Captures the model the pipeline trains (the object the result was evaluated with)."""
    import astra.pipeline as pipeline

    seen: dict = {}
    real = pipeline.train

    def spy(model, *args, **kwargs):  # noqa: ANN001, ANN202
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    return seen


@pytest.mark.parametrize(
    "overrides, converted",
    [
        (["debug=tiny", "method=lora"], False),  # W untouched: the adapter as trained
        (["debug=tiny", "method=pissa"], True),  # W_res = W - B0 A0: converted to rank 2r on W
        (["debug=tiny", "method=astra"], True),
        (["debug=tiny_llama", "method=astra", "eval.limit=1", "task.max_length=512"], True),  # causal LM
    ],
    ids=["lora", "pissa", "astra", "astra-llama"],
)
def test_saved_model_loads_with_plain_peft_in_a_fresh_process(compose, monkeypatch, overrides, converted):
    import json
    import subprocess
    import sys

    import torch

    from astra.models import eval_mode

    seen = trained_model_of(monkeypatch)
    from astra.pipeline import run_experiment

    cfg = compose([*overrides, "trainer.save_model=true", "trainer.lr=5e-3"])
    result = run_experiment(cfg)
    artifacts = result.run_info.artifacts
    adapter = Path(artifacts["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == artifacts["base_model"]
    assert "site-packages" not in config["base_model_name_or_path"]  # the random base is saved with the run
    assert config["r"] == (2 * cfg.method.rank if converted else cfg.method.rank)
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model = seen["model"]
    with eval_mode(model), torch.no_grad():
        expected = model(input_ids=ids).logits
    # the adapter really moved the model away from the base (the check below is not trivially true)
    with eval_mode(model), torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)
    out = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_PLAIN_PEFT, str(adapter), str(cfg.task.head),
         json.dumps(ids.tolist())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
