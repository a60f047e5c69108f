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


# --- per-sample outputs and the evaluate-only command ----------------------------------------------------
SCORES = ("accuracy", "/n", "f1")  # throughput metrics differ between runs by nature


def scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if any(s in k for s in SCORES) and "throughput" not in k}


def evaluate_only(*args: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "astra.evaluate_only", *args], capture_output=True, text=True,
                         timeout=600, env=os.environ)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout[out.stdout.index("\n{") + 1 :]  # after any banner line
    return json.loads(text[: text.rindex("}") + 1])


def test_generation_samples_saved_and_evaluate_only_rescores_the_run(compose):
    import json

    from astra.pipeline import run_experiment

    cfg = compose(["debug=tiny_llama", "method=astra", "task.max_length=512", "eval.limit=3",
                   "trainer.save_model=true"])  # fmt: skip
    result = run_experiment(cfg)
    rows = [json.loads(line) for line in Path(result.run_info.artifacts["samples"]).read_text().splitlines()]
    assert Path(result.run_info.artifacts["samples"]).parent == Path(cfg.paths.results_dir) / "samples"
    assert len(rows) == 3 * len(cfg.task.eval_sets)  # final evaluation only, every evaluated prompt once
    assert {"set", "id", "generation", "answer", "gold", "correct"} <= set(rows[0])
    for name in cfg.task.eval_sets:  # the saved per-sample verdicts are the metric
        hits = [r["correct"] for r in rows if r["set"] == name]
        assert sum(hits) / len(hits) == pytest.approx(result.eval_info.metrics[f"{name}/accuracy"])
    path = Path(cfg.paths.results_dir) / "runs" / f"{result.run_info.signature}.json"
    rescored = evaluate_only(str(path))
    assert scores(rescored) == pytest.approx(scores(result.eval_info.metrics))
    assert scores(rescored)  # not vacuous
    folder = Path(result.run_info.artifacts["adapter"]).parent
    again = [json.loads(x) for x in (folder / "evaluation.samples.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in again] == [r["generation"] for r in rows]


def test_evaluate_only_on_an_export_folder_with_overrides(compose):
    from astra.pipeline import run_experiment

    result = run_experiment(
        compose(["debug=tiny", "method=pissa", "trainer.save_model=true", "trainer.lr=5e-3"])
    )
    folder = Path(result.run_info.artifacts["adapter"]).parent
    rescored = evaluate_only(str(folder))
    assert scores(rescored) == pytest.approx(scores(result.eval_info.metrics))
    fewer = evaluate_only(str(folder), "eval.limit=8", "--out", str(folder / "limit8.json"))
    assert fewer["n_eval"] == 8 and (folder / "limit8.json").is_file()


@pytest.mark.integration
def test_real_gguf_conversion_is_sealed_and_a_corrupted_copy_is_rebuilt(tmp_path, caplog):
    """The embedded SmolLM2 GGUF: the converted folder is sealed with tokenizer.json required; a copy whose
    weights were corrupted in place (same size) is reconverted, with a warning, to the same tensors."""
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    cfg = models.model_config("smollm2-135m")
    gguf = models.package_dir(cfg.path) / cfg.gguf_file
    entry = models.convert_gguf(gguf, os.environ["ASTRA_CACHE_DIR"])  # the session's shared conversion
    assert problem(entry, models.CONVERTED_MODEL_FILES) is None and (entry / "tokenizer.json").is_file()
    copy = tmp_path / "cache" / "models" / entry.name
    shutil.copytree(entry, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:  # flip bytes inside the tensor data: loads fine, wrong weights
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x7f" * 64)
    with caplog.at_level(logging.WARNING, logger="astra.artifacts"):
        assert models.convert_gguf(gguf, tmp_path / "cache") == copy
    assert f"converted model {copy} failed verification" in caplog.text
    fresh, reference = load_file(str(weights)), load_file(str(entry / "model.safetensors"))
    assert fresh.keys() == reference.keys() and all(torch.equal(fresh[k], reference[k]) for k in fresh)
