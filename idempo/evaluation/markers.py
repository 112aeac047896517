"""The `marker` judge: a response scores 100 if it matches any of the persona's regex markers, else 0.

For traits with a lexical signature (lucky, bliss, ...) it is free, deterministic and offline, which is
also what makes CPU tests of learning meaningful. It never refuses.
"""

from __future__ import annotations

from idempo.personas import Persona


class MarkerJudge:
    name = "marker"
    binary = True  # scores are 0 or 100: confidence intervals are for a proportion

    def __init__(self, persona: Persona):
        if not persona.markers:
            raise ValueError(f"persona {persona.name!r} has no markers; choose another evaluation.judge")
        self.persona = persona

    def score(self, items: list[tuple[str, str]]) -> list[float | None]:
        """One score per (prompt, response): 100.0 or 0.0 (None would mean a refusal)."""
        return [100.0 if self.persona.matches_markers(response) else 0.0 for _, response in items]
