"""A content-addressed on-disk cache of endpoint and judge answers: a repeated question costs nothing.

One small JSON file per key (`<dir>/ab/abcdef....json`), written atomically: safe for many trials on
one machine or on shared storage, and readable with `cat`. Callers store raw answers, not scores, so
that changing how a score is computed never needs the endpoint again (docs/metrics.md, "Cache").
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from idempo.artifacts import write_json


def idempo_cache_root() -> Path:
    """$IDEMPO_CACHE, else ~/.cache/idempo: the tiny model and the endpoint cache live here."""
    return Path(os.environ.get("IDEMPO_CACHE", Path.home() / ".cache" / "idempo"))


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class DiskCache:
    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else idempo_cache_root() / "endpoint-cache"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, value)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"
