"""Content-keyed cache of per-layer tensors (Astra's eigenvalues and selected eigenvectors).

The key is the sha256 of a JSON "material" dict (model identity and weight fingerprints, layer
names, calibration data hash, N, seq_len, seed, format and every statistic/selection option). An
entry is used only when its stored material equals the requested one *and* its tensor file's
sha256 equals the one recorded at write time: nothing is trusted because a path exists. Entries
are written to a temporary folder and renamed into place, so a crash never leaves a half entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("astra.cache")
TENSORS, META = "tensors.safetensors", "meta.json"


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


class TensorCache:
    """`root/<namespace>/<key>/{tensors.safetensors, meta.json}`."""

    def __init__(self, root: str | Path, namespace: str):
        self.dir = Path(root) / namespace

    def entry(self, material: dict[str, Any]) -> Path:
        return self.dir / cache_key(material)

    def load(self, material: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, extra) of a verified entry, or None (a miss, or an entry that failed verification)."""
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
        """Write an entry atomically; returns its folder."""
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
                shutil.rmtree(path)  # an entry that failed verification is replaced
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
