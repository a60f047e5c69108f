"""End-to-end runs on the tiny random BERT: result JSON, skip-existing, failures, multirun, wandb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from astra.results import load_store, read_result
from astra.run import run_experiment
from tests.conftest import requires_data

TINY = ["model=tiny-bert", "task=glue/mrpc", "trainer.max_steps=2", "task.train_limit=64", "eval.limit=32"]
pytestmark = requires_data


def result_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "results").rglob("*.json"))


@pytest.mark.parametrize("method", ["lora", "full_ft"])
def test_run_writes_success_result_with_schema(compose, tmp_path, method):
    result = run_experiment(compose([*TINY, f"method={method}"]))
    (path,) = result_files(tmp_path)
    data = json.loads(path.read_text())
    assert set(data) >= {"run_info", "train_info", "eval_info", "meta_info"}
    run, train = data["run_info"], data["train_info"]
    assert run["status"] == "success" and run["signature"] == path.stem and run["error"] == ""
    assert run["config"]["method"]["name"] == method and len(run["git_sha"]) in (0, 40)
    assert [row["step"] for row in train["history"]] == [1, 2]
    assert all({"loss", "grad_norm", "lr"} <= set(row) for row in train["history"])
    assert train["trainable_params"] > 0 and train["wall_seconds"] > 0
    assert set(data["eval_info"]["metrics"]) == {"accuracy", "f1", "n_eval"}
    assert data["eval_info"]["metrics"]["n_eval"] == 32
    assert any(p.endswith("mrpc/train.tsv") for p in data["meta_info"]["data_files"])
    assert data["meta_info"]["packages"]["torch"]
    # function preserved at init: LoRA starts with B = 0, full fine-tuning touches nothing
    assert train["step0_loss"] == pytest.approx(train["base_loss"], abs=1e-6)
    assert read_result(path).ok and result.ok


def test_trainable_parameters_lora_vs_full(compose):
    lora = run_experiment(compose([*TINY, "method=lora", "method.rank=4"])).train_info
    full = run_experiment(compose([*TINY, "method=full_ft"])).train_info
    assert full.trainable_params == full.total_params
    assert 0 < lora.trainable_params < full.trainable_params


def test_finished_run_is_skipped(compose, tmp_path, capsys):
    cfg = compose([*TINY, "method=lora"])
    assert run_experiment(cfg) is not None
    first = result_files(tmp_path)[0].read_bytes()
    assert run_experiment(cfg) is None
    assert "skip" in capsys.readouterr().out
    assert result_files(tmp_path)[0].read_bytes() == first


def test_failed_run_is_recorded_then_rerun(compose, tmp_path):
    bad = compose([*TINY, "method=lora", "method.target_modules=[no_such_layer]"])
    with pytest.raises(ValueError):
        run_experiment(bad)
    (path,) = result_files(tmp_path)
    failed = read_result(path)
    assert failed.run_info.status == "failed" and "no_such_layer" in failed.run_info.error
    with pytest.raises(ValueError):  # a failed result is not "done": the run is attempted again
        run_experiment(bad)


def test_multirun_writes_one_result_per_run_and_resumes(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "astra.run", "-m", *TINY, "method=lora,full_ft", "seed=0,1", "logger=none",
           f"paths.results_dir={results}", f"paths.output_dir={tmp_path / 'out'}",
           f"hydra.sweep.dir={tmp_path / 'hydra'}"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert first.returncode == 0, first.stderr[-2000:]
    store = load_store(results, "adhoc")
    assert len(store) == 4 and all(r.ok for r in store)
    assert {(r.run_info.config["method"]["name"], r.run_info.config["seed"]) for r in store} == {
        ("lora", 0), ("lora", 1), ("full_ft", 0), ("full_ft", 1)}  # fmt: skip
    mtimes = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert second.returncode == 0
    assert second.stdout.count("[astra] skip") == 4
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == mtimes


def test_wandb_offline_run(compose, tmp_path):
    result = run_experiment(compose([*TINY, "method=lora", "logger=wandb"]))
    run_dirs = list((tmp_path / "outputs").rglob("offline-run-*"))
    assert result.ok and run_dirs, "wandb should write an offline run directory"
    assert any(p.suffix == ".wandb" for p in run_dirs[0].iterdir())


def test_code_task_without_permission_fails_before_training(compose, tmp_path):
    cfg = compose(
        ["model=tiny-llama", "task=code", "method=lora", "trainer.max_steps=2", "task.train_limit=8"]
    )
    with pytest.raises(PermissionError, match="allow_code_execution"):
        run_experiment(cfg)
    (path,) = result_files(tmp_path)
    assert read_result(path).train_info.history == []  # refused before any training step


def test_function_change_at_init_is_flagged_for_methods_that_claim_preservation(caplog):
    from astra.methods import get_method
    from astra.run import load_registry, warn_if_function_changed

    load_registry()
    lora = get_method("lora")
    assert not warn_if_function_changed(lora, 0.693147, 0.693150, "float32")  # rounding
    assert warn_if_function_changed(lora, 0.693147, 0.70, "float32")  # a broken init
    assert "claims to preserve" in caplog.text
    assert not warn_if_function_changed(lora, 0.693147, 0.70, "bfloat16")  # within bf16 rounding of W_res
