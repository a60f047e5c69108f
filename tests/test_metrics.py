"""GLUE metrics against closed forms on random inputs, and the GLUE loaders against SOURCES.md counts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from astra.data import MissingDataError, build_task
from astra.evaluate.metrics import compute_metrics
from astra.models import load_tokenizer, model_config

rng = np.random.default_rng(0)


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tie = x == value
        r[tie] = r[tie].mean()
    return r


@pytest.mark.parametrize("trial", range(5))
def test_classification_metrics_equal_closed_forms(trial):
    gold, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    tp, fp = np.sum((pred == 1) & (gold == 1)), np.sum((pred == 1) & (gold == 0))
    fn, tn = np.sum((pred == 0) & (gold == 1)), np.sum((pred == 0) & (gold == 0))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    got = compute_metrics(["accuracy", "f1", "matthews"], pred, gold)
    assert got["accuracy"] == pytest.approx(np.mean(pred == gold))
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["matthews"] == pytest.approx(mcc)


@pytest.mark.parametrize("trial", range(5))
def test_regression_metrics_equal_closed_forms(trial):
    gold = rng.integers(0, 6, 300).astype(float)  # ties, as in STS-B's integer-heavy scores
    pred = gold + rng.normal(0, 1.5, 300)
    got = compute_metrics(["pearson", "spearman"], pred, gold)
    assert got["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    assert got["spearman"] == pytest.approx(np.corrcoef(ranks(pred), ranks(gold))[0, 1])


def test_unknown_metric_names_valid_ones():
    with pytest.raises(ValueError, match="valid: accuracy"):
        compute_metrics(["bleu"], [1], [1])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(model_config("tiny-bert"), "/tmp")  # committed tiny tokenizer: no package needed


# Rows and label counts from ../shared/data/SOURCES.md.
GLUE_COUNTS = {
    "rte": {"train": {0: 1249, 1: 1241}, "dev": {0: 146, 1: 131}},
    "sst2": {"dev": {0: 428, 1: 444}},
    "mrpc": {"dev": None},
    "cola": {"dev": None},
    "qnli": {"dev": {0: 2702, 1: 2761}},
}
GLUE_ROWS = {"mrpc": {"train": 3668, "dev": 408}, "cola": {"train": 8551, "dev": 1043}, "stsb": {"dev": 1500}}


@pytest.mark.integration  # checks the whole staged benchmark file (tests/conftest.py)
@pytest.mark.parametrize("name", ["rte", "sst2", "mrpc", "cola", "qnli", "stsb"])
def test_glue_files_load_with_published_counts(compose, tokenizer, name):
    cfg = compose([f"task=glue/{name}"])
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir)
    for split, counts in GLUE_COUNTS.get(name, {}).items():
        labels = [ex["label"] for ex in task.load_split(split)]
        if counts:
            assert Counter(labels) == counts
    for split, rows in GLUE_ROWS.get(name, {}).items():
        assert len(task.load_split(split)) == rows
    example = task.eval_examples[0]
    assert all(isinstance(example[f], str) and example[f] for f in cfg.task.text_fields)
    assert set(task.data_files) and all(len(h) == 64 for h in task.data_files.values())


def test_missing_data_names_path_and_hub_id(compose, tokenizer, tmp_path):
    cfg = compose(["task=glue/rte", f"paths.data_dir={tmp_path}"])
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir)
    with pytest.raises(MissingDataError) as err:
        task.load_split("train")
    assert str(tmp_path / "glue" / "rte" / "train.tsv") in str(err.value)
    assert "nyu-mll/glue" in str(err.value)
