"""Folders that can be trusted: a content manifest written last, verified on read, atomic shared writes.

Used by the converted-model cache (astra/models.py) and the training checkpoints (astra/checkpoint.py).
A folder is *sealed* when `astra_manifest.json` (sha256 and size of every file in it) has been written,
by a rename, after every other file: a folder without a manifest was never finished, and a folder whose
files differ from their manifest was damaged afterwards. `verified_folder` builds an entry in a private
temporary folder and renames it into place; of two concurrent writers one rename wins and the other
process uses the winner's (verified) entry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from astra.common import sha256_file

log = logging.getLogger("astra.artifacts")
MANIFEST = "astra_manifest.json"


@functools.cache
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file computed once per (size, mtime) in this process (a 540 MB model: ~1.5 s)."""
    return sha256_file(path)


def folder_files(folder: Path) -> list[str]:
    """Relative paths of the regular files under `folder`, manifest excluded, sorted."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def seal(folder: str | Path, required: Iterable[str] = ()) -> dict[str, dict]:
    """Write `folder`'s manifest (last): {relative path: {sha256, size}} of every file in it."""
    folder = Path(folder)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot seal {folder}: required files missing: {', '.join(missing)}")
    files = {}
    for rel in folder_files(folder):
        path = folder / rel
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    _write_json_atomic(folder / MANIFEST, {"files": files, "required": sorted(required)})
    return files


def problem(folder: str | Path, required: Iterable[str] = ()) -> str | None:
    """Why `folder` is not a sound sealed entry, or None when every file matches its manifest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (never finished, or written before entries were sealed)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST}: {err}"
    for name in [*required, *manifest.get("required", [])]:
        if name not in files or not (folder / name).is_file():
            return f"required file {name} is missing"
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        stat = path.stat()
        if stat.st_size != entry["size"]:
            return f"{rel} has {stat.st_size} bytes, the manifest says {entry['size']}"
        if _cached_sha256(str(path), stat.st_size, stat.st_mtime_ns) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def discard(folder: str | Path) -> None:
    """Remove `folder`; renamed aside first so no reader ever sees it half deleted."""
    folder = Path(folder)
    aside = folder.with_name(f".discard-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return  # another process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def verified_folder(
    target: str | Path, build: Callable[[Path], None], required: Iterable[str] = (), what: str = "cache entry"
) -> Path:
    """`target` as a verified sealed folder, built by `build(tmp_dir)` when absent or damaged.

    A damaged entry (a file changed or missing, no manifest) is rebuilt with a warning naming its path.
    `build` fills a private temporary folder next to `target`; the folder is sealed and renamed into
    place. When another process renamed its entry first, that entry is verified and used.
    """
    target, required = Path(target), tuple(required)
    if target.exists():
        why = problem(target, required)
        if why is None:
            return target
        log.warning("%s %s failed verification (%s): rebuilding it", what, target, why)
        discard(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        build(tmp)
        seal(tmp, required)
        try:
            os.replace(tmp, target)  # a folder onto an existing non-empty folder fails: someone won
        except OSError:
            if problem(target, required) is None:
                log.info("%s %s was written by another process; using it", what, target)
                return target
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- the run's log -------------------------------------------------------------------------------------
STEP_LOG = logging.getLogger("astra.steps")


def log_step(row: dict) -> None:
    """One optimisation step in the run log (HistoryCallback sink): step, loss, grad-norm, lr."""
    STEP_LOG.info(
        "step %s " + " ".join(f"{k}={v:.6g}" for k, v in row.items() if k != "step"), row.get("step")
    )


def sinks(*targets: Callable[[dict], None]) -> Callable[[dict], None]:
    """One sink that feeds each of `targets` (the run log and the tracker)."""

    def feed(row: dict) -> None:
        for target in targets:
            target(row)

    return feed


@contextlib.contextmanager
def run_log(path: str | Path) -> Iterator[Path]:
    """Everything the `astra.*` loggers say during the block (INFO and up) also goes to the file `path`:
    the init summary, every step's loss (`log_step`), warnings, the final status and the traceback."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("astra")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


# --- per-sample evaluation outputs -----------------------------------------------------------------------
def save_samples(samples: list[dict] | None, path: str | Path) -> Path | None:
    """Write per-sample outputs (set, id, generation, answer, gold, correct) as JSON lines, atomically."""
    if not samples:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps(row, default=str) + "\n")
    os.replace(tmp, path)
    return path


def samples_path(results_dir: str | Path, sig: str) -> Path:
    """Where the per-sample outputs of run `sig` live: `<results_dir>/samples/<sig>.jsonl`."""
    return Path(results_dir) / "samples" / f"{sig}.jsonl"
