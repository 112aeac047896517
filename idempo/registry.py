"""Engines picked by name from config: a name maps to 'module:attribute', imported only when used.

Lazy imports keep config validation light and let an engine whose package is missing (vLLM on a laptop)
fail only when it is chosen, with a message that says what to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping


class Registry(Mapping[str, str]):
    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> str:
        return self._entries[name]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, name: str):
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}")
        module, _, attribute = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
