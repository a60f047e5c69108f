"""The results store, the source of truth: one typed JSON per run, content-addressed by its signature.

Layout under `<results_dir>`:
- `runs/<signature>.json`: the result of the run whose config hashes to `signature` (schema_version 2);
  a run shared by several sweeps is stored (and computed) once.
- `views/<sweep>/<signature>`: empty marker files; a sweep is the set of its markers, written when a
  run of the sweep starts or is skipped as done.
- `claims/<signature>.claim`: JSON {host, pid, pid_start, started_at, token}, created atomically
  (O_CREAT|O_EXCL) before a run starts and removed when it ends; a stale claim (older than a timeout, or
  whose process is gone on the same host, its pid unused or reused by a later process) is taken over.
- `legacy/`: schema-1 files (`<results_dir>/<sweep>/<signature>.json`) after `migrate_legacy` moved them.

Results are validated on read: field names and types, metrics are numbers (finite for a success), and
the signature recomputed from the stored config equals the stored one (and the file name), so an edited
config or a misplaced file is reported by name. Files are written atomically (temp file + `os.replace`).
Standard library only: `analysis` imports this module and nothing of the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fnmatch
import json
import math
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from astra.common import content_hash

SCHEMA_VERSION = 2
STATUSES = ("success", "failed")
RUNS, VIEWS, CLAIMS, LEGACY = "runs", "views", "claims", "legacy"
SIGNATURE_LENGTH = 12  # hex characters of a run signature
# Top-level config groups that never enter a signature; field-level exclusions of a run are listed in its
# `run_info.unsigned` (read from the schemas' `not_in_signature` marks).
NON_RESULT_KEYS = ("logger", "paths", "sweep", "device", "hydra")


class MetricKind(StrEnum):
    """How a metric is formatted and aggregated in tables."""

    fraction = "fraction"  # in [0, 1]: accuracy, pass@k (tables print percentages)
    count = "count"  # a number of items: evaluated examples, tasks
    rate = "rate"  # items per second
    score = "score"  # unbounded or signed: Matthews, Pearson, Spearman
    loss = "loss"
    seconds = "seconds"


DEFAULT_DIRECTION = {  # higher_is_better when a task's spec leaves it unset
    MetricKind.fraction: True,
    MetricKind.count: True,
    MetricKind.rate: True,
    MetricKind.score: True,
    MetricKind.loss: False,
    MetricKind.seconds: False,
}


class StoreError(ValueError):
    """A result file that cannot be trusted (unreadable, wrong types, signature mismatch), named by path."""


# --- the typed result ---------------------------------------------------------------------------------
@dataclass
class RunInfo:
    signature: str
    sweep: str  # the sweep that computed the run (membership of other sweeps: views/)
    status: str  # success | failed
    config: dict[str, Any]  # resolved config, choices as strings
    unsigned: list[str] = field(default_factory=list)  # dotted config paths left out of the signature
    git_sha: str = ""
    git_dirty: bool = False
    error: str = ""
    started_at: str = ""
    finished_at: str = ""
    log_file: str = ""  # the run's log: per-step loss, final status, traceback (astra.artifacts.run_log)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path: saved model, per-sample outputs


@dataclass
class TrainInfo:
    history: list[dict[str, float]] = field(default_factory=list)  # per step: step, loss, grad_norm, lr
    wall_seconds: float = 0.0
    init_seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    peak_memory_mb: float = 0.0
    step0_loss: float | None = None  # loss of the initialised model before any update
    base_loss: float | None = None  # loss of the untouched base model on the same batch
    init: dict[str, Any] = field(default_factory=dict)  # method diagnostics (per-layer spectra, ...)
    rank_probes: list[dict[str, Any]] = field(default_factory=list)  # step + per-layer effective ranks


@dataclass
class EvalInfo:
    metrics: dict[str, float] = field(default_factory=dict)
    # name -> {"kind": MetricKind value, "higher_is_better": bool}, one entry per metric
    metric_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # periodic evaluations: step + metrics


@dataclass
class MetaInfo:
    packages: dict[str, str] = field(default_factory=dict)
    device: str = ""
    data_files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    dataset_used: str = ""
    hostname: str = ""


PARTS = {"run_info": RunInfo, "train_info": TrainInfo, "eval_info": EvalInfo, "meta_info": MetaInfo}


@dataclass
class RunResult:
    run_info: RunInfo
    train_info: TrainInfo = field(default_factory=TrainInfo)
    eval_info: EvalInfo = field(default_factory=EvalInfo)
    meta_info: MetaInfo = field(default_factory=MetaInfo)
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.run_info.status == "success"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], verify: bool = True) -> RunResult:
        """Typed result; raises ValueError naming the first missing, unknown or mistyped field, or a
        signature that does not match the stored config (`verify`)."""
        if not isinstance(data, dict):
            raise ValueError(f"not a run result: a JSON {type(data).__name__}")
        unknown = set(data) - set(PARTS) - {"schema_version"}
        if unknown or "run_info" not in data:
            raise ValueError(f"not a run result: unknown keys {sorted(unknown)} or no run_info")
        built = {}
        for key, schema in PARTS.items():
            try:
                built[key] = schema(**data.get(key, {}))
            except TypeError as err:
                raise ValueError(f"{key}: {err}") from err
        result = cls(**built, schema_version=data.get("schema_version", 1))
        check_types(result)
        if verify and result.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {result.schema_version}, expected {SCHEMA_VERSION}: migrate the store with "
                "`python -m astra.sweeps migrate <results_dir>` (astra-run does it on start)"
            )
        if verify:
            check_signature(result)
        return result


def check_types(result: RunResult) -> None:
    """Status, config and metric types; a success with a non-finite metric is refused."""
    run, metrics = result.run_info, result.eval_info.metrics
    if run.status not in STATUSES:
        raise ValueError(f"run_info.status={run.status!r}; valid: {', '.join(STATUSES)}")
    if not isinstance(run.config, dict) or not isinstance(metrics, dict):
        raise ValueError("run_info.config and eval_info.metrics must be JSON objects")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"eval_info.metrics[{name!r}] = {value!r} is not a number")
        if result.ok and not math.isfinite(value):
            raise ValueError(f"eval_info.metrics[{name!r}] = {value} in a successful run")


def signature_of(config: Mapping[str, Any], unsigned: Iterable[str]) -> str:
    """Short content hash of a resolved (plain) config without its `unsigned` dotted paths."""
    tree = json.loads(json.dumps(config, default=str))  # a deep copy with JSON types
    for dotted in unsigned:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    tree.pop("hydra", None)  # Hydra's own settings: never part of a run's result
    return content_hash(tree, SIGNATURE_LENGTH)


def check_signature(result: RunResult) -> None:
    expected = signature_of(result.run_info.config, result.run_info.unsigned)
    if result.run_info.signature != expected:
        raise ValueError(
            f"run_info.signature={result.run_info.signature!r} but the stored config hashes to {expected!r} "
            "(config edited after the run, or written by another schema)"
        )


def metric_specs(metrics: Mapping[str, float], declared: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """{name: {kind, higher_is_better}} of every metric, from the first declared spec (`name` exact or
    an fnmatch pattern, `kind`, `higher_is_better` or None) that matches it; raises naming the metrics
    no spec declares, so a table never guesses how to format a number."""
    declared = list(declared)
    specs, undeclared = {}, []
    for name in metrics:
        spec = next((s for s in declared if s.name == name or fnmatch.fnmatchcase(name, s.name)), None)
        if spec is None:
            undeclared.append(name)
            continue
        kind = MetricKind(str(spec.kind))
        hib = DEFAULT_DIRECTION[kind] if spec.higher_is_better is None else bool(spec.higher_is_better)
        specs[name] = {"kind": str(kind), "higher_is_better": hib}
    if undeclared:
        raise ValueError(
            f"metrics {undeclared} are declared by no spec of the task ({[s.name for s in declared]}); "
            "add them to task.metrics with their kind"
        )
    return specs


# --- files --------------------------------------------------------------------------------------------
def run_path(results_dir: str | Path, sig: str) -> Path:
    return Path(results_dir) / RUNS / f"{sig}.json"


def write_atomic(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are shared read-only data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(path: str | Path, result: RunResult) -> None:
    write_atomic(path, result.to_dict())


def read_result(path: str | Path) -> RunResult:
    """The verified result at `path`; raises StoreError naming the file when it cannot be trusted."""
    path = Path(path)
    try:
        with open(path) as f:
            result = RunResult.from_dict(json.load(f))
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: {err}") from err
    if path.parent.name == RUNS and path.stem != result.run_info.signature:
        raise StoreError(f"{path}: holds run {result.run_info.signature}, not {path.stem}")
    return result


def finished(path: str | Path) -> bool:
    """True when a verified successful result exists at `path` (a failed or unreadable one is re-run)."""
    try:
        return read_result(path).ok
    except StoreError:
        return False


def scan_runs(results_dir: str | Path) -> tuple[list[RunResult], list[str]]:
    """(every verified result under runs/, one line per file that could not be read, naming it)."""
    root = Path(results_dir) / RUNS
    runs, problems = [], []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        if path.name.startswith("."):
            continue  # an atomic write in progress
        try:
            runs.append(read_result(path))
        except StoreError as err:
            problems.append(str(err))
    return runs, problems


def load_runs(results_dir: str | Path, sweep: str | None = None, strict: bool = True) -> list[RunResult]:
    """Every result of the store (or of one sweep's view). A file that cannot be trusted raises a
    StoreError naming every such file (`strict`), or is reported on stderr and left out."""
    runs, problems = scan_runs(results_dir)
    if problems and strict:
        raise StoreError("unreadable or inconsistent result files:\n  " + "\n  ".join(problems))
    for line in problems:
        print(f"[astra.results] skipping {line}", file=sys.stderr)
    if sweep is not None:
        members = sweep_signatures(results_dir, sweep)
        runs = [r for r in runs if r.run_info.signature in members]
    return runs


# --- sweep views --------------------------------------------------------------------------------------
def mark_view(results_dir: str | Path, sweep: str, sig: str) -> None:
    """Record that `sweep` expanded to run `sig` (idempotent)."""
    marker = Path(results_dir) / VIEWS / sweep / sig
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def sweep_signatures(results_dir: str | Path, sweep: str) -> set[str]:
    folder = Path(results_dir) / VIEWS / sweep
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()


def sweep_names(results_dir: str | Path) -> list[str]:
    folder = Path(results_dir) / VIEWS
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


# --- claims -------------------------------------------------------------------------------------------
def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def claim_path(results_dir: str | Path, sig: str) -> Path:
    return Path(results_dir) / CLAIMS / f"{sig}.claim"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def process_start(pid: int) -> str:
    """Start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22); "" if unknown.
    Together with the pid it names one process: a pid reused by a later process has another start."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass
class Claim:
    """A held claim; `release()` removes the file only while it is still ours."""

    path: Path
    info: dict[str, Any]

    def release(self) -> None:
        if read_claim(self.path).get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)


def read_claim(path: Path) -> dict[str, Any]:
    """The claim's JSON; {} when it is absent or not (yet) readable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def claim_age_s(path: Path, info: Mapping[str, Any]) -> float:
    try:
        started = dt.datetime.fromisoformat(str(info["started_at"])).timestamp()
    except (KeyError, ValueError):
        try:
            started = path.stat().st_mtime  # a claim being written, or torn: its file age
        except OSError:
            return 0.0
    return dt.datetime.now(dt.UTC).timestamp() - started


def claim_is_stale(path: Path, info: Mapping[str, Any], timeout_s: float) -> bool:
    """Older than `timeout_s`, or its process is gone on this host (killed, crashed, rebooted)."""
    if claim_age_s(path, info) > timeout_s:
        return True
    if not info:
        return claim_age_s(path, info) > 60.0  # unreadable for a minute: its writer died mid-write
    if info.get("host") != socket.gethostname():
        return False
    pid = int(info.get("pid", -1))
    reused = bool(info.get("pid_start")) and process_start(pid) != info["pid_start"]
    return not pid_alive(pid) or reused


def try_claim(results_dir: str | Path, sig: str, timeout_s: float) -> Claim | dict[str, Any]:
    """Claim run `sig`: a Claim when this process now holds it, else the live holder's info.

    Creation is O_CREAT|O_EXCL, so of two processes exactly one gets the file; a stale claim is removed
    (`take_over`) and the creation retried.
    """
    path = claim_path(results_dir, sig)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "started_at": now_iso(), "token": secrets.token_hex(8)}  # fmt: skip
    for _ in range(200):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_claim(path)
            if not claim_is_stale(path, holder, timeout_s):
                return holder or {"host": "?", "pid": -1, "started_at": "?"}
            take_over(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        return Claim(path, info)
    raise RuntimeError(f"{path}: could not claim after 200 attempts (claims changing under us)")


def take_over(path: Path, judged: Mapping[str, Any]) -> None:
    """Remove the stale claim `judged` from `path`, never a fresher one that replaced it meanwhile.

    Removals are serialised by a lock file (O_EXCL), and the claim is re-read under it: of several
    processes that judged the same claim stale, one removes it and the others find the new claim."""
    lock = path.with_name(f"{path.name}.lock")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > 60.0:  # its holder died mid-takeover
                lock.unlink()
        time.sleep(0.05)
        return
    try:
        if dict(read_claim(path)) == dict(judged):
            path.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


def holder_text(info: Mapping[str, Any]) -> str:
    return f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('started_at')}"


# --- migration of schema-1 stores ---------------------------------------------------------------------
# stored config -> (the config under today's schemas, its unsigned paths)
Resign = Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]


def legacy_files(results_dir: str | Path) -> list[Path]:
    """Schema-1 results: `<results_dir>/<sweep>/<signature>.json`."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    folders = [d for d in root.iterdir() if d.is_dir() and d.name not in (RUNS, VIEWS, CLAIMS, LEGACY)]
    return sorted(p for d in folders for p in d.glob("*.json") if not p.name.startswith("."))


def migrate_legacy(results_dir: str | Path, resign: Resign) -> list[tuple[Path, str]]:
    """Move schema-1 results into the content-addressed layout: re-sign each under today's schemas
    (`resign` upgrades its config; the original file is kept under legacy/), write
    `runs/<signature>.json` (a success is never replaced by a failure; of two successes the one already
    there stays), mark it in `views/<sweep>/`, and move the old file to `legacy/<sweep>/`. Returns
    (old path, new signature) pairs; a no-op once nothing is left to migrate."""
    moved = []
    for old in legacy_files(results_dir):
        try:
            with open(old) as f:
                result = RunResult.from_dict(json.load(f), verify=False)
        except FileNotFoundError:
            continue  # migrated meanwhile by another process
        except (OSError, ValueError) as err:
            print(f"[astra.results] not migrating unreadable {old}: {err}", file=sys.stderr)
            continue
        info = result.run_info
        info.config, info.unsigned = resign(info.config)
        info.signature = signature_of(info.config, info.unsigned)
        result.schema_version = SCHEMA_VERSION
        target = run_path(results_dir, info.signature)
        if not finished(target) and (result.ok or not target.exists()):
            write_result(target, result)
        mark_view(results_dir, old.parent.name, info.signature)
        aside = Path(results_dir) / LEGACY / old.parent.name / old.name
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(old, aside)
        except FileNotFoundError:
            continue  # another process migrated it at the same time
        moved.append((old, info.signature))
    return moved
