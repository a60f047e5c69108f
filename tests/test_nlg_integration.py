"""End to end on the embedded SmolLM2-135M: train 2 steps with LoRA, evaluate a few examples, write the result.

Kept small for 2 CPU cores (short generations, 2-4 examples); the numbers are not meaningful, the
plumbing is: the metric is recorded, the data really used is named, the files read are hashed.
"""

from __future__ import annotations

import pytest

from astra.pipeline import run_experiment
from tests.conftest import DATA_DIR, requires_data

pytestmark = [pytest.mark.integration, requires_data]

SMALL = ["model=smollm2-135m", "method=lora", "trainer.max_steps=2", "trainer.batch_size=2",
         "task.train_limit=8", "eval.batch_size=4", "task.max_length=256"]  # fmt: skip


def test_metamath_records_gsm8k_accuracy(compose):
    cfg = compose(
        [*SMALL, "task=metamath", "task.eval_sets=[gsm8k]", "eval.limit=4", "task.max_new_tokens=48"]
    )
    result = run_experiment(cfg)
    metrics = result.eval_info.metrics
    assert result.ok and metrics["gsm8k/n"] == 4 and 0.0 <= metrics["gsm8k/accuracy"] <= 1.0
    assert "substitute for MetaMathQA" in result.meta_info.dataset_used
    assert any(p.endswith("gsm8k/test.jsonl") for p in result.meta_info.data_files)
    assert result.run_info.config["task"]["version"] >= 1


def test_code_records_humaneval_pass_at_1(compose):
    cfg = compose([*SMALL, "task=code", "task.eval_sets=[humaneval]", "eval.limit=2", "task.max_new_tokens=48",
                   "eval.allow_code_execution=true"])  # fmt: skip
    result = run_experiment(cfg)
    assert result.ok and 0.0 <= result.eval_info.metrics["humaneval/pass@1"] <= 1.0
    assert "Code Alpaca" in result.meta_info.dataset_used


def test_commonsense_records_both_protocols(compose):
    cfg = compose([*SMALL, "task=commonsense", "task.eval_sets=[boolq,hellaswag,winogrande]", "eval.limit=2"])
    result = run_experiment(cfg)
    metrics = result.eval_info.metrics
    staged = 2 + (DATA_DIR / "commonsense" / "hellaswag" / "test.json").exists()
    assert result.ok and metrics["commonsense/n_tasks"] == staged  # a missing test file is skipped, not faked
    for key in ("gen/boolq/accuracy", "gen/winogrande/accuracy", "loglik/boolq/acc", "loglik/winogrande/acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "gen/avg_accuracy" in metrics and "loglik/avg_acc" in metrics
