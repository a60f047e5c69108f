"""Cluster launchers for real, through Hydra's `submitit_local` launcher (the submitit SLURM code path with
a local executor): a multirun writes one result per job; a job of 2 tasks (the multi-GPU-per-job SLURM
recipe, conf/hydra/launcher/slurm_multigpu.yaml) is one run on 2 ranks and writes exactly one result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def astra_run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "astra.run", "-m", "hydra/launcher=submitit_local", "debug=tiny", "device=cpu",
           f"paths.results_dir={tmp_path}/results", f"paths.output_dir={tmp_path}/out",
           f"hydra.sweep.dir={tmp_path}/multirun", "hydra.launcher.timeout_min=10", *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def results(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs").glob("*.json"))]


def test_submitit_local_multirun_one_result_per_job(tmp_path: Path) -> None:
    proc = astra_run(tmp_path, "method=lora,pissa", "sweep.name=launch")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = results(tmp_path)
    assert sorted(r["run_info"]["config"]["method"]["name"] for r in runs) == ["lora", "pissa"]
    assert all(r["run_info"]["status"] == "success" for r in runs)
    assert len(list((tmp_path / "results" / "views" / "launch").iterdir())) == 2
    assert len(list((tmp_path / "multirun" / ".submitit").rglob("*_result.pkl"))) == 2  # ran as submitit jobs


def test_submitit_job_of_two_tasks_is_one_run_on_two_ranks(tmp_path: Path) -> None:
    proc = astra_run(tmp_path, "method=astra", "hydra.launcher.tasks_per_node=2", "trainer.batch_size=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = results(tmp_path)
    assert run["run_info"]["status"] == "success"
    assert len(run["train_info"]["init"]["ranks_sha256"]) == 64  # both tasks joined one process group


def test_slurm_recipes_are_submitit_slurm_configs() -> None:
    """The recipes name only fields of submitit's SlurmQueueConf (a typo would fail at sbatch time)."""
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    fields = set(SlurmQueueConf.__dataclass_fields__)
    for name in ("slurm.yaml", "slurm_multigpu.yaml"):
        recipe = yaml.safe_load((REPO / "conf" / "hydra" / "launcher" / name).read_text())
        assert recipe.pop("defaults") == ["submitit_slurm"]
        assert set(recipe) <= fields, set(recipe) - fields
    multi = yaml.safe_load((REPO / "conf" / "hydra" / "launcher" / "slurm_multigpu.yaml").read_text())
    assert multi["tasks_per_node"] == multi["gpus_per_node"]  # one rank per GPU
