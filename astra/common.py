"""Constants and hashing shared across the library (standard library only, so any module may import it).

- `content_hash(obj)`: the one content hash of JSON-able data (sorted keys, compact separators), used by
  run signatures and content-keyed caches; `sha256_file(path)`: the one file hash (data files, caches).
- `IGNORE_INDEX`: the label Hugging Face losses skip (prompt tokens, padding).
- `PEFT_PREFIX`: what `peft.get_peft_model` prepends to every module name of the wrapped model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
PEFT_PREFIX = "base_model.model."


def canonical_json(obj: Any) -> str:
    """JSON text that depends only on content: key order and whitespace never change it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int | None = None) -> str:
    """sha256 hex digest of `canonical_json(obj)`, cut to `length` characters when given."""
    digest = hashlib.sha256(canonical_json(obj).encode()).hexdigest()
    return digest[:length] if length else digest


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
