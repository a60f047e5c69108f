"""`astra-run`: the Hydra entry point. One run = model, task, method, (statistics), init, train,
evaluate, result JSON. A run whose successful result already exists is skipped, so re-running an
interrupted multirun resumes it without duplicating finished runs.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import platform
import resource
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from astra import config as schemas
from astra.data import Task, build_task
from astra.methods import BuildContext, InitMethod, get_method
from astra.models import load_model
from astra.probes import make_rank_probe
from astra.results import (
    EvalInfo,
    MetaInfo,
    RunInfo,
    RunResult,
    finished,
    result_path,
    signature,
    write_result,
)
from astra.tracking import make_tracker
from astra.trainer import HistoryCallback, PeriodicEvalCallback, batch_loss, count_parameters, train

log = logging.getLogger("astra")
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "wandb", "lm-eval")


def load_registry() -> None:
    """Import every module that registers methods, task families or schemas."""
    import astra.astra_init  # noqa: F401
    import astra.nlg  # noqa: F401
    import baselines  # noqa: F401

    schemas.register_all()


def git_state() -> tuple[str, bool]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def device_name(cfg: DictConfig) -> str:
    if cfg.device != "cpu" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{platform.processor() or platform.machine()}"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def probe_batch(task: Task, size: int = 8) -> dict[str, torch.Tensor]:
    """A fixed batch of training examples for the base-vs-initialised loss check."""
    return next(iter(DataLoader(task.train_dataset[:size], batch_size=size, collate_fn=task.collator())))


def warn_if_function_changed(method: InitMethod, base: float, step0: float, dtype: str) -> bool:
    """Warn when a method that claims to preserve the model at init changed its loss beyond rounding."""
    tolerance = (1e-4 if dtype == "float32" else 5e-2) * max(1.0, abs(base))  # bf16/fp16 round W_res
    changed = method.preserves_function and abs(step0 - base) > tolerance
    if changed:
        log.warning("%s claims to preserve the model at init, but the loss moved %.6f -> %.6f (tolerance %.0e)",
                    method.name, base, step0, tolerance)  # fmt: skip
    return changed


def build_context(cfg: DictConfig, task: Task, model_id: str) -> BuildContext:
    def calib_batches():
        from astra.calib import calibration_batches

        return calibration_batches(task, cfg.calib)

    task_type = "SEQ_CLS" if cfg.task.family == "glue" else "CAUSAL_LM"
    return BuildContext(
        cfg=cfg,
        calib_batches=calib_batches,
        task_type=task_type,
        cache_dir=cfg.paths.cache_dir,
        model_id=model_id,
    )


def execute(cfg: DictConfig, sig: str, tracker: Any, result: RunResult) -> None:
    """Fill `result` in place as the run proceeds, so a failure still records what happened."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=cfg.seed)
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir, seed=cfg.seed)
    task.check_eval(cfg.eval)
    result.meta_info.dataset_used = task.dataset_used
    method = get_method(cfg.method.name)
    probe = probe_batch(task)
    result.train_info.base_loss = batch_loss(model, probe)

    model, report = method.build(model, build_context(cfg, task, model_id))
    info = result.train_info
    info.init_seconds, info.init = report.init_seconds, {"layers": report.layers, **report.extra}
    info.step0_loss = batch_loss(model, probe)
    warn_if_function_changed(method, info.base_loss, info.step0_loss, cfg.model.dtype)
    info.trainable_params, info.total_params = count_parameters(model)
    log.info(
        "%s: init %.2fs, trainable %d / %d, loss base %.5f -> step 0 %.5f",
        method.name, info.init_seconds, info.trainable_params, info.total_params, info.base_loss, info.step0_loss,
    )  # fmt: skip
    scalars = {
        k: v for k, v in report.extra.items() if isinstance(v, int | float | str)
    }  # calib tokens, cache
    tracker.summary({"init_seconds": info.init_seconds, "trainable_params": info.trainable_params,
                     "base_loss": info.base_loss, "step0_loss": info.step0_loss, **scalars})  # fmt: skip

    history = HistoryCallback(sink=tracker.log)
    periodic = PeriodicEvalCallback(task, cfg.eval, cfg.trainer.eval_every, sink=tracker.log)
    run_dir = str(Path(cfg.paths.output_dir) / cfg.sweep.name / sig)
    rank_probe = make_rank_probe(model, task, cfg, sink=tracker.log)
    info.wall_seconds = train(
        model, task, cfg, run_dir, [history, periodic] + ([rank_probe] if rank_probe else [])
    )
    info.history, info.peak_memory_mb = history.history, peak_memory_mb()
    info.rank_probes = rank_probe.records if rank_probe else []

    metrics = task.evaluate(model, cfg.eval)
    result.eval_info = EvalInfo(metrics=metrics, history=periodic.history)
    result.meta_info.data_files = task.data_files
    result.meta_info.dataset_used = task.dataset_used
    tracker.summary({f"eval/{k}": v for k, v in metrics.items()})
    log.info("%s %s: %s", cfg.task.name, method.name, {k: round(v, 4) for k, v in metrics.items()})


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_experiment(cfg: DictConfig) -> RunResult | None:
    """Run one configured experiment and write its result JSON; None when it was already done."""
    load_registry()
    sig = signature(cfg)
    path = result_path(cfg.paths.results_dir, cfg.sweep.name, sig)
    if finished(path):
        print(f"[astra] skip {cfg.sweep.name}/{sig} ({cfg.method.name}, {cfg.task.name}, seed {cfg.seed}): "
              f"successful result exists at {path}")  # fmt: skip
        return None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    sha, dirty = git_state()
    result = RunResult(
        run_info=RunInfo(signature=sig, sweep=cfg.sweep.name, status="failed", config=resolved, git_sha=sha,
                         git_dirty=dirty, started_at=now()),
        meta_info=MetaInfo(packages=package_versions(), device=device_name(cfg), hostname=platform.node()),
    )  # fmt: skip
    tracker = make_tracker(cfg, sig, resolved, str(Path(cfg.paths.output_dir) / cfg.sweep.name / sig))
    try:
        execute(cfg, sig, tracker, result)
        result.run_info.status = "success"
    except BaseException:
        result.run_info.error = traceback.format_exc()
        raise
    finally:
        result.run_info.finished_at = now()
        write_result(path, result)
        tracker.finish(exit_code=0 if result.ok else 1)
        print(f"[astra] {result.run_info.status}: {path}")
    return result


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The run config Hydra would build for `astra-run <overrides>` (for tests and notebooks)."""
    from hydra import compose, initialize_config_dir

    load_registry()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


@hydra.main(config_path=str(REPO_ROOT / "conf"), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_experiment(cfg)


def main() -> None:
    load_registry()  # schemas must be in the ConfigStore before Hydra composes
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    sys.exit(hydra_main())


if __name__ == "__main__":
    main()
