"""GLUE metrics, computed with scikit-learn and scipy (the `evaluate` package needs the Hub)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(accuracy_score(gold, pred))


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(f1_score(gold, pred))  # binary F1 of the positive class, as GLUE reports for MRPC/QQP


def _matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(matthews_corrcoef(gold, pred))


def _pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(pearsonr(pred, gold)[0])


def _spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(spearmanr(pred, gold)[0])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews": _matthews,
    "pearson": _pearson,
    "spearman": _spearman,
}
REGRESSION_METRICS = {"pearson", "spearman"}


def compute_metrics(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """{name: value} for each metric name; predictions are class ids (or scores for regression)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
    pred, gold = np.asarray(predictions), np.asarray(references)
    if pred.shape != gold.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {gold.shape[0]} references")
    return {name: METRICS[name](pred, gold) for name in names}
