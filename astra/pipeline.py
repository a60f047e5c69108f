"""One run = model, task, method (statistics, init), train, evaluate, result JSON; `astra.run` is its CLI.

Run identity and the store (astra.results): a run is named by its signature (the hash of the config
fields that can change its result). Before starting it marks itself in its sweep's view, skips when a
successful result of its signature exists (computed by any sweep), and claims the signature atomically
so that concurrent jobs never compute it twice. A failure is recorded as a `failed` result and re-run
by the next pass of the sweep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import logging
import os
import platform
import resource
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from astra import config as schemas
from astra import distributed
from astra import results as store
from astra.artifacts import log_step, run_log, samples_path, save_samples, sinks
from astra.build import build_trainable
from astra.checkpoint import remove_checkpoints
from astra.common import sha256_file
from astra.data import Task, build_task
from astra.export import export_trained, save_init_adapter
from astra.forgetting import forgetting_probe
from astra.forgetting import metric_specs as forgetting_specs
from astra.guards import NonFiniteGuard, check_finite_loss, check_finite_metrics, check_finite_weights
from astra.methods import BuildContext, InitMethod, get_method, load_methods
from astra.models import CONF_DIR, REPO_ROOT, load_model
from astra.results import EvalInfo, MetaInfo, RunInfo, RunResult
from astra.tracking import NullTracker, make_tracker
from astra.trainer import HistoryCallback, PeriodicEvalCallback, batch_loss, count_parameters, train
from astra.validate import (
    check_adapter_targets,
    check_generation_length,
    check_group_choices,
    check_results_dir,
    check_task_data,
)

log = logging.getLogger("astra")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "wandb", "lm-eval")


# --- registry and config ------------------------------------------------------------------------------
def load_registry() -> None:
    """Import every module that registers methods, task families or schemas."""
    import astra.nlg  # noqa: F401  (registers the math, code and commonsense task families)

    load_methods()
    schemas.register_all()


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The run config Hydra would build for `astra-run <overrides>` (for tests and notebooks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    load_registry()
    check_group_choices(list(overrides or []), CONF_DIR)  # lists nested options (glue/*) on a typo
    if GlobalHydra.instance().is_initialized():  # inside `astra-run` (hydra.main): the same conf/ tree
        return compose(config_name="config", overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def method_schema(name: str) -> type | None:
    """The registered schema of method `name` (None for a method no longer registered)."""
    try:
        return type(get_method(name)).schema
    except KeyError:
        return None


def compatible(old: Any, new: Any) -> bool:
    """Whether a stored value can stand where today's schema has `new` (same JSON shape; None = optional)."""
    if old is None or new is None:
        return True
    if isinstance(new, list):
        return isinstance(old, list) and all(not isinstance(v, dict | list) for v in old) == all(
            not isinstance(v, dict | list) for v in new
        )
    if isinstance(new, bool) or isinstance(old, bool):
        return type(old) is type(new)
    numbers = int | float
    return (isinstance(old, numbers) and isinstance(new, numbers)) or type(old) is type(new)


def overlay(today: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Today's config for the same choices, with every stored value that still has a compatible field.

    Fields added since take today's default (which must reproduce the old behaviour: that is the rule
    for adding a field); fields removed since are dropped; a field whose shape changed (task.metrics:
    names -> specs) takes today's value."""
    merged = {}
    for key, value in today.items():
        if key not in old:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            merged[key] = overlay(value, old[key])
        else:
            merged[key] = old[key] if compatible(old[key], value) else value
    return merged


def upgrade_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(config, unsigned paths) of a stored config under today's schemas (store migration): composed from
    the same model, task and method options, overlaid with the stored values (see `overlay`). A config
    whose options no longer exist keeps its values, signed with the schemas it names."""
    from omegaconf import OmegaConf

    choices = [f"{group}={(config.get(group) or {}).get('name')}" for group in ("model", "task", "method")]
    try:
        today = compose_config(choices)
        merged = OmegaConf.merge(today, overlay(schemas.to_plain(today), config))
    except Exception as err:  # noqa: BLE001 (an option or value today's schemas refuse: keep the config)
        log.warning("migration: %s does not compose today (%s); its stored config is kept", choices, err)
        return config, schemas.unsigned_paths(config, schemas.static_schema_at(config, method_schema))
    upgraded, unsigned, _ = schemas.run_identity(merged)
    return upgraded, unsigned


def migrate_store(results_dir: str | Path) -> int:
    """Move schema-1 result files into the content-addressed layout; the number moved."""
    if not store.legacy_files(results_dir):
        return 0
    load_registry()
    moved = store.migrate_legacy(results_dir, upgrade_config)
    for old, sig in moved:
        print(f"[astra] migrated {old} -> {store.run_path(results_dir, sig)}")
    return len(moved)


# --- run metadata -------------------------------------------------------------------------------------
def git_state(results_dir: str | Path | None = None) -> tuple[str, bool]:
    """(HEAD, whether tracked files differ from it), the committed results store excepted: a sweep
    rewriting its own tracked results must not mark the code that produced them as modified."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    store = Path(results_dir).resolve() if results_dir else None
    exclude = (
        [f":(exclude){store.relative_to(REPO_ROOT)}"] if store and store.is_relative_to(REPO_ROOT) else []
    )
    return git("rev-parse", "HEAD"), bool(
        git("status", "--porcelain", "--untracked-files=no", "--", ".", *exclude)
    )


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


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --- the run ------------------------------------------------------------------------------------------
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

    return BuildContext(
        cfg=cfg,
        calib_batches=calib_batches,
        task_type=str(cfg.task.head).upper(),  # seq_cls -> PEFT's SEQ_CLS, causal_lm -> CAUSAL_LM
        cache_dir=cfg.paths.cache_dir,
        model_id=model_id,
    )


def scratch_dir(cfg: DictConfig, sig: str) -> str:
    return str(Path(cfg.paths.output_dir) / cfg.sweep.name / sig)


def log_path(cfg: DictConfig, sig: str) -> Path:
    """The run's log file (per-step loss, status, traceback); appended to by every attempt."""
    name = "run.log" if distributed.is_main() else f"run.rank{distributed.rank()}.log"  # torchrun: per rank
    return Path(scratch_dir(cfg, sig)) / name


def execute(cfg: DictConfig, sig: str, tracker: Any, result: RunResult) -> None:
    """Fill `result` in place as the run proceeds, so a failure still records what happened."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_id = load_model(cfg.model, cfg.task, cfg.paths.cache_dir, seed=cfg.seed)
    method = get_method(cfg.method.name)
    if method.trains_adapters:  # targets and rank, before any data is read or statistic computed
        check_adapter_targets(model, cfg)
    task = build_task(cfg.task, tokenizer, cfg.paths.data_dir, seed=cfg.seed)
    task.check_eval(cfg.eval)
    if cfg.eval.get("backend", "hf") == "vllm":  # before any training: name the missing extra
        importlib.import_module("astra.vllm_backend").require_vllm()
    check_task_data(task, cfg.eval)  # every split read and validated before training
    result.meta_info.dataset_used = task.dataset_used
    probe = probe_batch(task)
    result.train_info.base_loss = batch_loss(model, probe)
    check_finite_loss("base-model loss", result.train_info.base_loss)
    forgetting = forgetting_probe(model, tokenizer, cfg)  # base model's held-out loss, before any init

    model, report = build_trainable(model, method, build_context(cfg, task, model_id))  # the one build path
    info = result.train_info
    info.init_seconds, info.init = report.init_seconds, {"layers": report.layers, **report.extra}
    if digest := distributed.check_identical_init(model):  # torchrun: every rank holds the same adapter
        info.init["ranks_sha256"] = digest
    info.step0_loss = batch_loss(model, probe)
    check_finite_loss(f"step-0 loss after the {method.name} init", info.step0_loss)
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

    history = HistoryCallback(sink=sinks(log_step, tracker.log))  # the run log and the tracker
    periodic = PeriodicEvalCallback(task, cfg.eval, cfg.trainer.eval_every, sink=tracker.log)
    callbacks = [NonFiniteGuard(), history, periodic]
    rank_probe = None
    if cfg.trainer.rank_probe_steps:  # probes import the effective-rank maths only when asked for
        from astra.probes import make_rank_probe

        rank_probe = make_rank_probe(model, task, cfg, sink=tracker.log)
        callbacks += [rank_probe] if rank_probe else []
    info.history = history.history  # filled in place: a failed run keeps its loss history so far
    keep = cfg.trainer.save_model and hasattr(model, "peft_config") and distributed.is_main()  # init adapter
    init_dir = save_init_adapter(model, Path(scratch_dir(cfg, sig)) / "init_adapter") if keep else None
    info.wall_seconds = train(model, task, cfg, scratch_dir(cfg, sig), callbacks)
    if not distributed.is_main():  # torchrun: rank 0 alone exports, evaluates and records
        return
    if cfg.trainer.save_model:  # loads with plain PEFT on the original base (astra.export.export_trained)
        saved = export_trained(model, tokenizer, cfg, init_dir, Path(scratch_dir(cfg, sig)) / "model")
        result.run_info.artifacts.update(saved)
    info.history, info.peak_memory_mb = history.history, peak_memory_mb()
    info.rank_probes = rank_probe.records if rank_probe else []

    check_finite_weights(model)  # never evaluate (and record) a model with NaN/inf weights
    task.__dict__.pop("samples", None)  # per-sample outputs of the final evaluation only (not periodic ones)
    metrics = task.evaluate(model, cfg.eval)
    saved = save_samples(task.__dict__.get("samples"), samples_path(cfg.paths.results_dir, sig))
    if saved:  # generation tasks: prompt id, generation, extracted answer, gold, correct; next to the result
        result.run_info.artifacts["samples"] = str(saved)
    check_finite_metrics(metrics)
    specs = task.metric_specs(metrics)
    if forgetting is not None:  # causal LMs: held-out loss after training minus the base model's
        extra = forgetting.after(model)
        metrics, specs = {**metrics, **extra}, {**specs, **forgetting_specs(extra)}
    result.eval_info = EvalInfo(metrics=metrics, metric_specs=specs, history=periodic.history)
    result.meta_info.data_files = {**task.data_files, **(forgetting.data_files if forgetting else {})}
    result.meta_info.dataset_used = task.dataset_used
    tracker.summary({f"eval/{k}": v for k, v in metrics.items()})
    log.info("%s %s: %s", cfg.task.name, method.name, {k: round(v, 4) for k, v in metrics.items()})


@functools.cache
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a data file, computed once per (size, mtime) in this process."""
    return sha256_file(path)


def changed_data(result: RunResult) -> list[str]:
    """Data files a stored run read whose content differs now (files absent on this machine: not compared)."""
    changed = []
    for name, digest in result.meta_info.data_files.items():
        path = Path(name)
        if path.is_file():
            stat = path.stat()
            if file_digest(str(path), stat.st_size, stat.st_mtime_ns) != digest:
                changed.append(name)
    return changed


def done(path: Path) -> bool:
    """A verified successful result exists at `path` and the data files it read are unchanged."""
    try:
        result = store.read_result(path)
    except store.StoreError:
        return False
    changed = changed_data(result) if result.ok else []
    if changed:
        log.warning("%s read data files that changed since (%s): running it again", path, ", ".join(changed))
    return result.ok and not changed


def describe(cfg: DictConfig, sig: str) -> str:
    return f"{cfg.sweep.name}/{sig} ({cfg.method.name}, {cfg.task.name}, seed {cfg.seed})"


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (SLURM preemption, `kill`) raises SystemExit, so the run records its failure and releases
    its claim on the way out; SIGKILL cannot be caught: its claim goes stale (dead pid) and is taken over."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def acquire(cfg: DictConfig, sig: str, path: Path) -> store.Claim | None:
    """The run's claim, or None when the run must not start here (done, or held by a live process)."""
    results_dir, timeout = cfg.paths.results_dir, cfg.sweep.claim_timeout_s
    while True:
        if done(path):
            print(f"[astra] skip {describe(cfg, sig)}: successful result exists at {path}")
            return None
        held = store.try_claim(results_dir, sig, timeout)
        if isinstance(held, store.Claim):
            if done(path):  # finished by the previous holder between our two looks
                held.release()
                continue
            return held
        if cfg.sweep.if_claimed == schemas.IfClaimed.skip:
            print(f"[astra] skip {describe(cfg, sig)}: claimed by {store.holder_text(held)}")
            return None
        log.info("%s is claimed by %s; waiting", sig, store.holder_text(held))
        time.sleep(cfg.sweep.claim_poll_s)


def run_experiment(cfg: DictConfig) -> RunResult | None:
    """Run one configured experiment and write its result JSON; None when it was done or is running
    elsewhere (claimed by a live process)."""
    load_registry()
    distributed.setup()  # torchrun / accelerate launch: join the process group
    config, unsigned, sig = schemas.run_identity(cfg)
    results_dir = cfg.paths.results_dir
    check_results_dir(results_dir)  # a run that cannot record its result must not start
    check_generation_length(cfg)
    migrate_store(results_dir)
    store.mark_view(results_dir, cfg.sweep.name, sig)  # also checks that the store is writable, early
    path = store.run_path(results_dir, sig)
    claim, go = distributed.main_decides(acquire, cfg, sig, path)  # rank 0 decides, every rank follows
    if not go:
        return None
    try:
        with sigterm_as_exit(), run_log(log_path(cfg, sig)):
            return run_claimed(cfg, config, unsigned, sig, path)
    finally:
        if claim is not None:  # held by rank 0
            claim.release()


def run_claimed(
    cfg: DictConfig, config: dict[str, Any], unsigned: list[str], sig: str, path: Path
) -> RunResult:
    sha, dirty = git_state(cfg.paths.results_dir)
    result = RunResult(
        run_info=RunInfo(signature=sig, sweep=cfg.sweep.name, status="failed", config=config, unsigned=unsigned,
                         git_sha=sha, git_dirty=dirty, started_at=now()),
        meta_info=MetaInfo(packages=package_versions(), device=device_name(cfg), hostname=platform.node()),
    )  # fmt: skip
    result.run_info.log_file = str(log_path(cfg, sig))
    if not distributed.is_main():  # other ranks train and exit; a failure here stops rank 0 (failed)
        execute(cfg, sig, NullTracker(), result)
        return result
    tracker = make_tracker(cfg, sig, config, scratch_dir(cfg, sig))
    try:
        execute(cfg, sig, tracker, result)
        result.run_info.status = "success"
    except BaseException:
        result.run_info.error = traceback.format_exc()
        log.error("run %s failed:\n%s", sig, result.run_info.error)
        raise
    finally:
        result.run_info.finished_at = now()
        log.info("status %s: %s", result.run_info.status, path)
        store.write_result(path, result)
        if result.ok and not cfg.trainer.keep_checkpoints:  # the result is written: nothing to resume
            remove_checkpoints(scratch_dir(cfg, sig))
        tracker.finish(exit_code=0 if result.ok else 1)
        print(f"[astra] {result.run_info.status}: {path} (pid {os.getpid()})")
    return result
