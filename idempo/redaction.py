"""Keys out of every message and file built from what an endpoint said.

A server may quote the request it got, headers included, in an error body or even in an answer (a
proxy's debug page, an echo server, a misconfigured gateway). Text from an endpoint goes through
`redact` before it becomes an exception, a log line or a file: the key itself wherever it appears,
and anything shaped like a credential (an Authorization header, `Bearer <token>`, an `sk-...` key).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
# Shorter "keys" (the "EMPTY" placeholder, a test server's "x") would blank out ordinary words.
MIN_SECRET_LENGTH = 6
# A key cut short by a message's truncation is still redacted from this many characters on.
MIN_PREFIX = 8

_VALUE = r"[^\s\"',;{}\[\]]+"
_KEY_LIKE = [
    # Authorization: Bearer abc / 'authorization': 'Basic abc' / x-api-key=abc
    re.compile(
        rf"(?i)((?:authorization|(?:x-)?api[-_]?key)[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?{_VALUE}"
    ),
    re.compile(rf"(?i)\b(bearer\s+){_VALUE}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
]


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with each of `secrets` (also a leading part of one, as an excerpt cut short leaves it) and
    every key-like token replaced by [redacted]."""
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            text = _secret_pattern(secret).sub(REDACTED, text)
    for pattern in _KEY_LIKE:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


def _secret_pattern(secret: str) -> re.Pattern:
    """The secret, or any leading part of it of at least MIN_PREFIX characters."""
    head = min(len(secret), MIN_PREFIX)
    rest = secret[head:]
    return re.compile(re.escape(secret[:head]) + "".join(f"(?:{re.escape(c)}" for c in rest) + ")?" * len(rest))
