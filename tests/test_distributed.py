"""Multi-process runs on CPU (gloo): `torchrun --nproc_per_node=2` over the pipeline of a tiny LLaMA.

- exactly one `success` result, written by rank 0, with the ranks' identical-init digest;
- the Astra init built from calibration batches sharded across the 2 ranks (all-reduced sums) equals the
  single-process init on the same batches (max abs difference reported, tolerance 1e-6 relative);
- every rank holds the bit-identical adapter and residual (sha256 per rank, and the tensors compared);
- the training losses equal a single-process run with the same global batch (relative 1e-5);
- rank 0 takes the skip-existing decision: a second torchrun of the same signature writes nothing.

Run as a script by torchrun (`python tests/test_distributed.py <out> <overrides>`), this file is the
worker: it builds the init (saved per rank), then runs the pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = ["debug=tiny_llama", "method=astra", "device=cpu", "logger=none", "trainer.max_steps=3",
             "trainer.lr=1e-3", "trainer.warmup_ratio=0.0"]  # fmt: skip


def initialised(overrides: list[str]) -> dict[str, torch.Tensor]:
    """LoRA A, B and the residual base weight of every adapted layer after the run's init (the
    pipeline's own steps: seed, model, task, calibration batches, `build_trainable`)."""
    from astra.build import build_trainable
    from astra.data import build_task
    from astra.methods import get_method
    from astra.models import load_model
    from astra.pipeline import build_context, compose_config

    cfg = compose_config(overrides)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=cfg.seed)
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir, seed=cfg.seed)
    model, _ = build_trainable(model, get_method(cfg.method.name), build_context(cfg, task, model_id))
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "base_layer" in n}


def worker(out: Path, overrides: list[str]) -> None:
    from astra import distributed
    from astra.pipeline import compose_config, run_experiment

    distributed.setup()
    torch.save(initialised(overrides), out / f"init_rank{distributed.rank()}.pt")
    distributed.barrier()
    run_experiment(compose_config(overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(__file__)), str(out), *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*.json"))]


def test_torchrun_two_ranks_matches_single_process(tmp_path: Path) -> None:
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    dist_dir.mkdir()
    paths = lambda root: [f"paths.results_dir={root}/results", f"paths.output_dir={root}/out"]  # noqa: E731
    proc = torchrun(dist_dir, OVERRIDES + paths(dist_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    # exactly one result, a success, written by rank 0, stating that both ranks built the same init
    (dist_result,) = results(dist_dir / "results")
    assert dist_result["run_info"]["status"] == "success"
    assert len(dist_result["train_info"]["init"]["ranks_sha256"]) == 64
    assert proc.stdout.count("[astra] success:") == 1

    # every rank: the bit-identical adapter and residual
    ranks = [torch.load(dist_dir / f"init_rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    # the sharded (all-reduced) init vs the single-process init on the same calibration samples
    from astra.pipeline import compose_config, run_experiment

    single_init = initialised(OVERRIDES + paths(single_dir))
    worst = 0.0
    for name, value in single_init.items():
        diff = (ranks[0][name] - value).abs().max().item()
        rel = diff / max(value.abs().max().item(), 1e-30)
        worst = max(worst, rel)
        assert rel <= 1e-6, (name, diff, rel)
    print(f"init: max relative difference sharded vs single process {worst:.3e}")

    # training losses with the same global batch (trainer.batch_size=4: 2 per rank under torchrun)
    single = run_experiment(compose_config(OVERRIDES + paths(single_dir)))
    assert single.ok and single.run_info.signature == dist_result["run_info"]["signature"]
    dist_losses = [row["loss"] for row in dist_result["train_info"]["history"]]
    single_losses = [row["loss"] for row in single.train_info.history]
    assert len(dist_losses) == len(single_losses) == 3
    print(f"losses: torchrun {dist_losses} single {single_losses}")
    assert dist_losses == pytest.approx(single_losses, rel=1e-5)
    assert single_losses[-1] != pytest.approx(single_losses[0], rel=1e-6)  # training moved the loss

    # the skip decision is taken once (rank 0) and followed by both ranks: nothing runs, nothing is written
    again = torchrun(dist_dir, OVERRIDES + paths(dist_dir))
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("[astra] skip") == 1 and "[astra] success" not in again.stdout
    assert len(results(dist_dir / "results")) == 1


def test_batch_split_and_engine_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    from astra import distributed

    assert distributed.per_device_batch(16) == 16 and distributed.trainer_arguments("fsdp", False) == {}
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.per_device_batch(16) == 4
    with pytest.raises(ValueError, match="not divisible by the 4 ranks"):
        distributed.per_device_batch(6)
    ds = distributed.trainer_arguments("deepspeed", False)["deepspeed"]
    config = json.loads(Path(ds).read_text())
    assert (
        config["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in config["zero_optimization"]
    )
    assert distributed.trainer_arguments("fsdp", True, fsdp_allowed=True)["fsdp"] == "full_shard auto_wrap"
    with pytest.raises(NotImplementedError, match="use ddp or deepspeed"):
        distributed.trainer_arguments("fsdp", True)
    assert distributed.trainer_arguments("ddp", True) == {}


def test_distributed_engine_is_not_signed_backend_is(tmp_path: Path) -> None:
    from astra import config as schemas
    from astra.pipeline import compose_config

    base = ["debug=tiny", f"paths.results_dir={tmp_path}"]
    sig = lambda extra: schemas.run_identity(compose_config(base + extra))[2]  # noqa: E731
    assert sig([]) == sig(["trainer.distributed=deepspeed"]) == sig(["trainer.distributed=fsdp"])
    assert sig([]) != sig(["eval.backend=vllm"])
    with pytest.raises(Exception, match="horovod"):
        compose_config(base + ["trainer.distributed=horovod"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_names_the_extra_before_training(tmp_path: Path) -> None:
    from astra.pipeline import compose_config, run_experiment
    from astra.vllm_backend import require_vllm

    with pytest.raises(ImportError, match=re.escape("pip install .[vllm]")):
        require_vllm()
    cfg = compose_config(["debug=tiny_llama", "eval.backend=vllm", f"paths.results_dir={tmp_path}/results",
                          f"paths.output_dir={tmp_path}/out"])  # fmt: skip
    with pytest.raises(ImportError, match="vllm"):
        run_experiment(cfg)
    (failed,) = results(tmp_path / "results")
    assert failed["run_info"]["status"] == "failed" and "pip install .[vllm]" in failed["run_info"]["error"]
    assert failed["train_info"]["history"] == []  # refused before any training step


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
