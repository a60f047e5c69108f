"""The results store: one JSON per run, `<results_dir>/<sweep>/<signature>.json`, the source of truth.

The schema is a typed dataclass validated on read, so analysis code never guesses at a field.
Files are written atomically (temp file + `os.replace`), so an interrupted run never leaves a
half-written result that a resumed sweep would mistake for a finished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SCHEMA_VERSION = 1
# Config fields that never change a run's result: they are left out of its signature.
NON_RESULT_KEYS = ("logger", "paths", "sweep", "device", "hydra", "trainer.dataloader_num_workers")
STATUSES = ("success", "failed")


@dataclass
class RunInfo:
    signature: str
    sweep: str
    status: str  # success | failed
    config: dict[str, Any]
    git_sha: str = ""
    git_dirty: bool = False
    error: str = ""
    started_at: str = ""
    finished_at: str = ""


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
    rank_probes: list[dict[str, Any]] = field(
        default_factory=list
    )  # astra/probes.py: step + per-layer eranks


@dataclass
class EvalInfo:
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # periodic evaluations: step + metrics


@dataclass
class MetaInfo:
    packages: dict[str, str] = field(default_factory=dict)
    device: str = ""
    data_files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    dataset_used: str = ""
    hostname: str = ""


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
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Typed result; raises ValueError naming the first missing or unknown field."""
        parts = {"run_info": RunInfo, "train_info": TrainInfo, "eval_info": EvalInfo, "meta_info": MetaInfo}
        unknown = set(data) - set(parts) - {"schema_version"}
        if unknown or "run_info" not in data:
            raise ValueError(f"not a run result: unknown keys {sorted(unknown)} or no run_info")
        built = {}
        for key, schema in parts.items():
            try:
                built[key] = schema(**data.get(key, {}))
            except TypeError as err:
                raise ValueError(f"{key}: {err}") from err
        if built["run_info"].status not in STATUSES:
            raise ValueError(f"run_info.status={built['run_info'].status!r}; valid: {', '.join(STATUSES)}")
        return cls(**built, schema_version=data.get("schema_version", SCHEMA_VERSION))


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest and isinstance(tree.get(head), dict):
        _drop(tree[head], rest)
    elif not rest:
        tree.pop(head, None)


def signature(cfg: DictConfig | dict[str, Any], length: int = 12) -> str:
    """Short content hash of the resolved config minus the fields that do not change the result."""
    tree = (
        OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, DictConfig)
        else json.loads(json.dumps(cfg))
    )
    for key in NON_RESULT_KEYS:
        _drop(tree, key)
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def result_path(results_dir: str | Path, sweep: str, sig: str) -> Path:
    return Path(results_dir) / sweep / f"{sig}.json"


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(path: str | Path, result: RunResult) -> None:
    write_atomic(path, result.to_dict())


def read_result(path: str | Path) -> RunResult:
    with open(path) as f:
        return RunResult.from_dict(json.load(f))


def finished(path: str | Path) -> bool:
    """True when a successful result exists at `path` (a failed or unreadable one is re-run)."""
    try:
        return read_result(path).ok
    except (OSError, ValueError):
        return False


def load_store(results_dir: str | Path, sweep: str | None = None) -> list[RunResult]:
    """Every valid result under `results_dir` (or one sweep of it), skipping temp files."""
    root = Path(results_dir) / sweep if sweep else Path(results_dir)
    return [read_result(p) for p in sorted(root.rglob("*.json")) if not p.name.startswith(".")]
