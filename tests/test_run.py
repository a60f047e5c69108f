"""End-to-end runs on the tiny random BERT: result JSON, skip-existing, failures, multirun, wandb,
content-addressed runs shared by sweeps, claims between concurrent processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astra.config import run_identity
from astra.pipeline import run_experiment
from astra.results import claim_path, load_runs, read_result, sweep_signatures
from tests.conftest import DATA_DIR, requires_data

TINY = ["debug=tiny"]  # conf/debug/tiny.yaml: tiny-bert, glue/mrpc, 2 steps, 64 train / 32 eval examples
pytestmark = requires_data


def result_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "results" / "runs").glob("*.json"))


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
    assert data["eval_info"]["metric_specs"] == {
        "accuracy": {"kind": "fraction", "higher_is_better": True},
        "f1": {"kind": "fraction", "higher_is_better": True},
        "n_eval": {"kind": "count", "higher_is_better": True},
    }
    assert sweep_signatures(tmp_path / "results", "adhoc") == {path.stem}
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
    store = load_runs(results, "adhoc")
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
    cfg = compose(["debug=tiny_llama", "task=code", "method=lora", "task.train_limit=8"])
    with pytest.raises(PermissionError, match="allow_code_execution"):
        run_experiment(cfg)
    (path,) = result_files(tmp_path)
    assert read_result(path).train_info.history == []  # refused before any training step


def test_function_change_at_init_is_flagged_for_methods_that_claim_preservation(caplog):
    from astra.methods import get_method
    from astra.pipeline import load_registry, warn_if_function_changed

    load_registry()
    lora = get_method("lora")
    assert not warn_if_function_changed(lora, 0.693147, 0.693150, "float32")  # rounding
    assert warn_if_function_changed(lora, 0.693147, 0.70, "float32")  # a broken init
    assert "claims to preserve" in caplog.text
    assert not warn_if_function_changed(lora, 0.693147, 0.70, "bfloat16")  # within bf16 rounding of W_res


# --- content-addressed runs, claims ---------------------------------------------------------------
def test_run_shared_by_two_sweeps_is_computed_once(compose, tmp_path, capsys):
    first = run_experiment(compose([*TINY, "method=lora", "sweep.name=glue_table1"]))
    second = run_experiment(compose([*TINY, "method=lora", "sweep.name=ablation_rank"]))
    assert first is not None and second is None and "successful result exists" in capsys.readouterr().out
    (path,) = result_files(tmp_path)
    results = tmp_path / "results"
    assert (
        sweep_signatures(results, "glue_table1") == sweep_signatures(results, "ablation_rank") == {path.stem}
    )
    assert [r.run_info.sweep for r in load_runs(results, "ablation_rank")] == ["glue_table1"]


def test_toggling_fields_that_cannot_change_the_result_reruns_nothing(compose, tmp_path):
    assert run_experiment(compose([*TINY, "method=astra"])) is not None
    (path,) = result_files(tmp_path)
    before = path.read_bytes()
    for toggle in ("method.cache=false", "eval.workers=1", "trainer.save_model=true", "device=cpu"):
        assert run_experiment(compose([*TINY, "method=astra", toggle])) is None, toggle
    assert path.read_bytes() == before


def astra_run(tmp_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "astra.run", *TINY, "method=lora", "logger=none",
           f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path / 'out'}", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_identical_runs_started_at_once_compute_one_result(tmp_path):
    procs = [astra_run(tmp_path), astra_run(tmp_path)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("[astra] success") == 1 and stdout.count("[astra] skip") == 1, stdout
    (path,) = result_files(tmp_path)
    assert read_result(path).ok and not claim_path(tmp_path / "results", path.stem).exists()


def test_waiting_run_skips_once_the_holder_finished(tmp_path):
    holder = astra_run(tmp_path)
    waiter = astra_run(tmp_path, "sweep.if_claimed=wait", "sweep.claim_poll_s=0.5")
    outs = [p.communicate(timeout=600) for p in (holder, waiter)]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("[astra] success") == 1 and stdout.count("[astra] skip") == 1, stdout
    assert len(result_files(tmp_path)) == 1


def test_killed_runs_stale_claim_is_taken_over(compose, tmp_path):
    cfg = compose([*TINY, "method=lora"])
    claim = claim_path(tmp_path / "results", run_identity(cfg)[2])
    victim = astra_run(tmp_path)  # killed as soon as it holds the claim (its run takes seconds more)
    deadline = time.monotonic() + 300
    while not claim.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert claim.exists(), victim.communicate()[1][-2000:]
    victim.send_signal(signal.SIGKILL)  # no clean-up: the claim file stays behind, naming a dead pid
    victim.wait()
    assert claim.exists() and not result_files(tmp_path)
    result = run_experiment(cfg)  # same signature: the stale claim is taken over, the run computed
    assert result is not None and result.ok and not claim.exists()


def test_a_run_on_changed_data_is_not_skipped_as_done(compose, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(DATA_DIR / "glue" / "mrpc", data / "glue" / "mrpc")
    cfg = compose([*TINY, "method=lora", f"paths.data_dir={data}"])
    assert run_experiment(cfg) is not None and run_experiment(cfg) is None
    dev = data / "glue" / "mrpc" / "dev.tsv"
    lines = dev.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    dev.write_text("".join([lines[0], *reversed(lines[1:])]), encoding="utf-8")  # same rows, another order
    rerun = run_experiment(cfg)
    assert rerun is not None and rerun.ok  # the stored result read other data: computed again
    assert run_experiment(cfg) is None


def test_cli_migrates_a_schema_1_store_and_skips_the_migrated_run(compose, tmp_path):
    from astra.results import write_atomic

    cfg = compose([*TINY, "method=lora"])
    config, _, signature = run_identity(cfg)
    del config["task"]["head"]  # as schema 1 wrote it: no head, metrics by name
    config["task"]["metrics"] = [m["name"] for m in config["task"]["metrics"]]
    legacy = {"run_info": {"signature": "0123456789ab", "sweep": "adhoc", "status": "success", "config": config},
              "schema_version": 1}  # fmt: skip
    write_atomic(tmp_path / "results" / "adhoc" / "0123456789ab.json", legacy)
    out, err = astra_run(tmp_path).communicate(timeout=600)
    assert "[astra] migrated" in out and "[astra] skip" in out, err[-2000:]
    assert [p.stem for p in result_files(tmp_path)] == [signature]


def test_submitit_local_multirun_writes_one_result_per_job(tmp_path):
    """The SLURM launcher's code path (submitit) with a local executor: each job in its own process."""
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "astra.run", "-m", "hydra/launcher=submitit_local", *TINY,
           "method=lora,full_ft", "sweep.name=submitit", f"paths.results_dir={results}",
           f"paths.output_dir={tmp_path / 'out'}", "hydra.launcher.timeout_min=10"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = load_runs(results, "submitit")
    assert sorted(r.run_info.config["method"]["name"] for r in runs) == ["full_ft", "lora"]
    assert all(r.ok for r in runs) and len(result_files(tmp_path)) == 2
