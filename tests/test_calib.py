"""Calibration set: seeded sampling, formats, padding, labels, user files, option validation."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from astra.calib import IGNORE_INDEX, batches_digest, calibration_batches, calibration_examples, count_tokens
from astra.config import CalibConfig
from astra.models import load_tokenizer, model_config
from tests.conftest import requires_data

CACHE = os.environ.get("ASTRA_CACHE_DIR", str(Path.home() / ".cache" / "astra"))


def calib(**kw) -> object:
    return OmegaConf.merge(OmegaConf.structured(CalibConfig), kw)


class FakeCausalTask:
    """A causal-LM task whose calibration text is a (prompt, response) pair or raw text."""

    def __init__(self, tokenizer, n: int = 20):
        self.cfg = SimpleNamespace(family="nlg")
        self.tokenizer = tokenizer
        self.train_examples = [{"instruction": f"Add {i} and {i}.", "output": f" {2 * i}"} for i in range(n)]

    def calibration_text(self, ex, fmt):
        if fmt == "code_release":
            return ex["instruction"] + "\n### Response:" + ex["output"]
        if fmt == "text":
            return ex["instruction"]
        return (f"Q: {ex['instruction']}\nA:", ex["output"])


@pytest.fixture(scope="module")
def llama_tok():
    return load_tokenizer(model_config("tiny-llama"), CACHE)


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer(model_config("tiny-bert"), CACHE)


def test_seeded_sampling_matches_release(llama_tok):
    task = FakeCausalTask(llama_tok)
    examples = calibration_examples(task, calib(n=5, seed=42))
    rng = random.Random(42)  # the release: random.seed(seed); random.sample(range(len(data)), n)
    assert examples == [task.train_examples[i] for i in rng.sample(range(20), 5)]
    assert examples != calibration_examples(task, calib(n=5, seed=43))


def test_causal_prompt_masked_and_padding_ignored(llama_tok):
    task = FakeCausalTask(llama_tok)
    batches = calibration_batches(task, calib(n=4, batch_size=2, seq_len=64))
    assert len(batches) == 2
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert labels.shape == ids.shape
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        for row in range(ids.shape[0]):
            supervised = labels[row] != IGNORE_INDEX
            assert supervised.any() and not supervised[0]  # the prompt's first token is masked
            assert torch.equal(labels[row][supervised], ids[row][supervised])


def test_code_release_max_length_padding_and_drop_last(llama_tok):
    task = FakeCausalTask(llama_tok)
    cfg = calib(
        n=3, batch_size=1, seq_len=32, format="code_release", padding="max_length", drop_last_token=True
    )
    batches = calibration_batches(task, cfg)
    for batch, ex in zip(batches, calibration_examples(task, cfg), strict=True):
        text = ex["instruction"] + "\n### Response:" + ex["output"]
        ref = llama_tok(text, truncation=True, max_length=32, padding="max_length")["input_ids"][:-1]
        assert batch["input_ids"].tolist() == [ref]
        assert batch["input_ids"].shape == (1, 31)
        assert (batch["input_ids"][batch["attention_mask"] == 0] == llama_tok.eos_token_id).all()
        assert (batch["labels"] != IGNORE_INDEX).sum() == batch[
            "attention_mask"
        ].sum()  # str text: no prompt mask


@requires_data
def test_glue_pairs_and_class_labels(bert_tok):
    from astra.data import build_task
    from astra.pipeline import compose_config

    cfg = compose_config(["model=tiny-bert", "task=glue/mrpc"])
    task = build_task(cfg.task, bert_tok, cfg.paths.data_dir)
    batches = calibration_batches(task, calib(n=6, batch_size=3, seq_len=40))
    examples = calibration_examples(task, calib(n=6, seed=42))
    assert [b["labels"].tolist() for b in batches] == [
        [e["label"] for e in examples[:3]],
        [e["label"] for e in examples[3:]],
    ]
    first = bert_tok(examples[0]["#1 String"], examples[0]["#2 String"], truncation=True, max_length=40)[
        "input_ids"
    ]
    assert batches[0]["input_ids"][0, : len(first)].tolist() == first
    assert "token_type_ids" in batches[0] and batches[0]["input_ids"].shape[1] <= 40
    real, total = count_tokens(batches)
    assert real == sum(int(b["attention_mask"].sum()) for b in batches) and total >= real


def test_user_files(tmp_path, llama_tok):
    task = FakeCausalTask(llama_tok)
    text_file = tmp_path / "calib.txt"
    text_file.write_text("first line of text\n\nsecond line\n")
    batches = calibration_batches(task, calib(n=2, batch_size=2, path=str(text_file)))
    rows = {
        tuple(r[m.bool()].tolist())
        for r, m in zip(batches[0]["input_ids"], batches[0]["attention_mask"], strict=True)
    }
    assert rows == {
        tuple(llama_tok("first line of text")["input_ids"]),
        tuple(llama_tok("second line")["input_ids"]),
    }

    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"instruction": f"Add {i}.", "output": " 0"}) for i in range(3)))
    batches = calibration_batches(task, calib(n=3, batch_size=3, path=str(jsonl), format="code_release"))
    assert batches[0]["input_ids"].shape[0] == 3

    with pytest.raises(FileNotFoundError, match="calib.path"):
        calibration_batches(task, calib(path=str(tmp_path / "missing.jsonl")))


def test_invalid_options_name_valid_ones(llama_tok):
    task = FakeCausalTask(llama_tok)
    with pytest.raises(ValueError, match="train_prompt, code_release, text"):
        calibration_batches(task, calib(format="chat"))
    with pytest.raises(ValueError, match="longest, max_length"):
        calibration_batches(task, calib(padding="right"))


def test_digest_tracks_content(llama_tok):
    task = FakeCausalTask(llama_tok)
    a = batches_digest(calibration_batches(task, calib(n=4)))
    assert a == batches_digest(calibration_batches(task, calib(n=4)))
    assert a != batches_digest(calibration_batches(task, calib(n=4, seed=1)))
    assert a != batches_digest(calibration_batches(task, calib(n=4, seq_len=5)))
