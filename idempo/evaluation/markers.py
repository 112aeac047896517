"""The `marker` judge: a response scores 100 if it matches any of the persona's regex markers, else 0.

For traits with a lexical signature (lucky, bliss, ...) it is free, deterministic and offline, which is
also what makes CPU tests of learning meaningful. It never refuses.
"""

from __future__ import annotations

from idempo.evaluation.judging import JudgeSpec, Judgment


class MarkerJudge:
    name = "marker"
    binary = True  # scores are 0 or 100: confidence intervals are for a proportion

    def __init__(self, spec: JudgeSpec):
        if not spec.persona.markers:
            raise ValueError(f"persona {spec.persona.name!r} has no markers; choose another backend")
        self.persona = spec.persona

    def score(self, items: list[tuple[str, str]]) -> list[Judgment]:
        return [
            Judgment(100.0 if self.persona.matches_markers(answer) else 0.0, False, None, "marker")
            for _, answer in items
        ]

    def take_usage(self) -> None:
        return None  # free: nothing to count
