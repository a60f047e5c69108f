"""Content-keyed cache of per-layer tensors (statistics, eigendecompositions).

The key is the sha256 of a JSON "material" dict (model identity and weight fingerprints, layer
names, calibration tokens and every statistic option; never the rank or the selection, so a rank
or selection ablation computes the statistics once). Layout of an entry:

    root/<namespace>/<key>/layers/<i>.safetensors   one file per layer, written as the layer streams in
    root/<namespace>/<key>/index.json               material, layer order, per-layer meta and sha256
    root/<namespace>/<key>/CHECKSUM                 sha256 of index.json, written last

Properties (each pinned by tests/test_cache.py):
- atomic: an entry is built in a temporary folder and renamed into place; a crash or an exception
  inside the writer leaves no entry;
- verified: an entry is used only when CHECKSUM matches index.json, the stored material equals the
  requested one and every layer file matches its sha256; a bad entry is removed with a warning (and
  rebuilt by the caller);
- concurrent writers: the first rename wins, a later writer finds a valid entry and drops its own;
- finite: `add` refuses NaN/inf (the entry is not written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("astra.cache")
TENSORS, META = "tensors.safetensors", "meta.json"  # legacy single-file entries (load/save)
INDEX, CHECKSUM, LAYERS = "index.json", "CHECKSUM", "layers"


def canonical(material: dict[str, Any]) -> str:
    return json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(material).encode()).hexdigest()


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_fingerprint(weight: torch.Tensor, samples: int = 4096) -> str:
    """sha256 of the shape, dtype and an evenly strided sample of a weight's values (cheap, exact)."""
    flat = weight.detach().reshape(-1)
    stride = max(1, flat.numel() // samples)
    sample = flat[::stride].float().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(weight.shape)}:{weight.dtype}".encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


class NonFiniteCacheError(ValueError):
    """A tensor with NaN/inf was offered to the cache (never stored)."""


def check_finite(layer: str, tensors: dict[str, torch.Tensor]) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteCacheError(f"cache: layer {layer!r} tensor {key!r} holds NaN/inf; not cached")


def _remove(path: Path) -> None:
    """Move `path` aside then delete it, so a reader never sees it half-deleted under its name."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class EntryWriter:
    """Streams one entry's layers into a temporary folder (see `TensorCache.writer`)."""

    def __init__(self, tmp: Path):
        self.tmp, self.layers, self.index = tmp, [], 0
        (tmp / LAYERS).mkdir()

    def add(self, layer: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        """Write one layer's tensors (finite, any shapes) and its JSON-able meta."""
        check_finite(layer, tensors)
        if any(entry["name"] == layer for entry in self.layers):
            raise ValueError(f"cache: layer {layer!r} added twice")
        file = self.tmp / LAYERS / f"{self.index}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file))
        json.dumps(meta or {})  # fails now, not at commit, when meta is not JSON-able
        self.layers.append(
            {"name": layer, "file": file.name, "sha256": sha256_path(file), "meta": meta or {}}
        )
        self.index += 1


class EntryReader(Mapping):
    """layer name -> (tensors, meta) of a verified entry; tensors are read lazily, one layer at a time."""

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path = path
        self.layers = {entry["name"]: entry for entry in index["layers"]}

    def __getitem__(self, layer: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        entry = self.layers[layer]
        return load_file(str(self.path / LAYERS / entry["file"])), entry["meta"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


class TensorCache:
    """`root/<namespace>/<key>/` entries (see the module docstring)."""

    def __init__(self, root: str | Path, namespace: str):
        self.dir = Path(root) / namespace

    def entry(self, material: dict[str, Any]) -> Path:
        return self.dir / cache_key(material)

    # ------------------------------------------------------------------ streaming per-layer API

    @contextmanager
    def writer(self, material: dict[str, Any]) -> Iterator[EntryWriter]:
        """`with cache.writer(material) as w: w.add(layer, tensors, meta)`; committed atomically on exit."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            writer = EntryWriter(tmp)
            yield writer
            index = {"material": json.loads(canonical(material)), "layers": writer.layers}
            (tmp / INDEX).write_text(json.dumps(index, indent=1, default=str))
            (tmp / CHECKSUM).write_text(sha256_path(tmp / INDEX))  # last: marks the entry complete
            self._commit(tmp, material)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path, material: dict[str, Any]) -> None:
        path = self.entry(material)
        for _ in range(3):
            try:
                os.rename(tmp, path)  # fails when `path` exists (non-empty folder): someone else won
                log.info("cache: wrote %s", path)
                return
            except OSError:
                if self.reader(material) is not None:
                    log.info("cache: entry %s was written concurrently; using it", path)
                    return
                # reader() removed the bad entry: try again

    def reader(self, material: dict[str, Any]) -> EntryReader | None:
        """The verified entry for `material`, or None (a miss; a bad entry is removed with a warning)."""
        path = self.entry(material)
        if not path.is_dir():
            return None
        problem = self._verify(path, material)
        if problem is None:
            return EntryReader(path, json.loads((path / INDEX).read_text()))
        log.warning("cache entry %s is bad (%s): removed, it will be rebuilt", path, problem)
        _remove(path)
        return None

    @staticmethod
    def _verify(path: Path, material: dict[str, Any]) -> str | None:
        try:
            checksum = (path / CHECKSUM).read_text().strip()
            if sha256_path(path / INDEX) != checksum:
                return "index checksum mismatch"
            index = json.loads((path / INDEX).read_text())
        except (OSError, json.JSONDecodeError) as err:
            return f"incomplete ({type(err).__name__})"
        if index.get("material") != json.loads(canonical(material)):
            return "different key material"
        for entry in index["layers"]:
            file = path / LAYERS / entry["file"]
            if not file.is_file() or sha256_path(file) != entry["sha256"]:
                return f"layer {entry['name']!r} failed its checksum"
        return None

    # ------------------------------------------------------------------ whole-entry API (former)

    def load(self, material: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, extra) of a verified single-file entry written by `save`, or None."""
        path = self.entry(material)
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("material") != json.loads(canonical(material)):
            log.warning("cache entry %s holds different key material: ignored", path)
            return None
        tensor_file = path / TENSORS
        if not tensor_file.is_file() or sha256_path(tensor_file) != meta.get("sha256"):
            log.warning("cache entry %s failed its checksum: ignored", path)
            return None
        return load_file(str(tensor_file)), meta.get("extra", {})

    def save(self, material: dict[str, Any], tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> Path:
        """Write a single-file entry atomically; returns its folder."""
        check_finite("*", tensors)
        path = self.entry(material)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
            meta = {
                "material": json.loads(canonical(material)),
                "sha256": sha256_path(tmp / TENSORS),
                "extra": extra,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
            if path.exists():
                _remove(path)  # an entry that failed verification is replaced
            try:
                os.rename(tmp, path)
            except OSError:
                if self.load(material) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
