"""Seeds of named random draws, so that a run resumed anywhere draws exactly what an uninterrupted one does."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 31-bit seed from named parts, stable across processes and Python versions."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
