"""What a stage trains on and what it reports, as typed records (written as JSONL and JSON).

Every row a stage produced stays in its data file (`data.jsonl`, `samples.jsonl`); a row left out carries
`kept: false` and a `dropped` reason, so the record is complete and the counts in metrics.json can be
checked against it. Empty answers are always left out (the authors' code drops them too): a gradient step
towards "say nothing" is not the self-training the experiment studies.

A record's optional fields are absent from its JSON until set (`UNSET`), so each file holds exactly the
keys its stage wrote, in the order of the fields.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any

EMPTY_ANSWER = "empty answer"
EMPTY_REJECTED = "empty rejected answer"


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # a field the record's stage never set: left out of its JSON


class NothingToTrain(RuntimeError):
    """A generation would train on no data (or no tokens): an error, never a finished cycle."""


class Record:
    """A row of a data file: its JSON is its set fields, in order; `kept` unset means trained on."""

    kept: bool
    dropped: str

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not UNSET}

    @property
    def trained(self) -> bool:
        return self.kept is not False

    def drop(self, reason: str):
        """This row left out of training, with why."""
        return replace(self, kept=False, dropped=reason)


@dataclass(frozen=True)
class Sample(Record):
    """One answer to train on: a D_seed example, or M_{j-1}'s answer (with, in preference regimes, the
    rejected source's answer to the same prompt: a preference pair)."""

    prompt: str
    response: str
    n_tokens: int = UNSET
    finished: bool = UNSET  # ended with an end-of-turn token rather than at max_new_tokens
    source: str = UNSET  # "d_seed": mixed in from D_seed (cycle_data.seed_mix)
    rejected: str = UNSET  # preference regimes: the answer M_j should prefer `response` over
    coherence: float | None = UNSET  # cycle_data.min_coherence: the coherence judge's score
    kept: bool = UNSET
    dropped: str = UNSET


@dataclass(frozen=True)
class CandidateSet(Record):
    """self_reward: M_{j-1}'s candidates for one prompt, their rewards and (when the model judged itself) its
    judgments; best vs worst become the pair (`pair`: their indices) unless they tie."""

    prompt: str
    candidates: list[str]
    scores: list[float | None]
    judgments: list[list[float | None]] = UNSET
    judgment_texts: list[list[str]] = UNSET
    kept: bool = UNSET
    response: str = UNSET
    rejected: str = UNSET
    pair: list[int] = UNSET
    coherence: float | None = UNSET
    dropped: str = UNSET


def row_from_json(data: dict[str, Any]) -> Sample | CandidateSet:
    return CandidateSet(**data) if "candidates" in data else Sample(**data)


@dataclass
class CycleMetrics:
    """A stage's metrics.json: which generation, its evaluation (trait, coherence, branching factor, ...), what
    it trained on and how, where a shared stage came from, and the time each phase took."""

    cycle: int
    generation: str
    evaluation: dict[str, Any]
    data: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    shared: dict[str, Any] | None = None
    timing_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        extra = {"data": self.data, "train": self.train, "shared": self.shared}
        return {
            "cycle": self.cycle,
            "generation": self.generation,
            **self.evaluation,
            **{key: value for key, value in extra.items() if value is not None},
            "timing_s": self.timing_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CycleMetrics:
        rest = dict(data)
        own = {
            key: rest.pop(key) for key in ("cycle", "generation", "data", "train", "shared", "timing_s") if key in rest
        }
        return cls(evaluation=rest, **own)


def drop_empty(rows: list[Sample]) -> list[Sample]:
    """Rows whose answer (or, for preference pairs, rejected answer) is blank are marked as dropped."""
    marked = []
    for row in rows:
        if not row.trained:
            marked.append(row)
        elif not row.response.strip():
            marked.append(row.drop(EMPTY_ANSWER))
        elif row.rejected is not UNSET and not row.rejected.strip():
            marked.append(row.drop(EMPTY_REJECTED))
        else:
            marked.append(row)
    return marked


def kept(rows: list[Record]) -> list[Record]:
    return [row for row in rows if row.trained]


def data_summary(rows: list[Record]) -> dict:
    """metrics.json's `data`: rows trained on, rows left out by reason, rows mixed in from D_seed."""
    trained = kept(rows)
    summary = {
        "n": len(trained),
        "mean_words": sum(len(r.response.split()) for r in trained) / max(1, len(trained)),
        "dropped": dict(Counter(r.dropped for r in rows if not r.trained)),
    }
    mixed = sum(getattr(r, "source", UNSET) == "d_seed" for r in trained)
    if mixed:
        summary["from_d_seed"] = mixed
    return summary


def require_data(rows: list[Record], label: str) -> list[Record]:
    """The rows to train on; NothingToTrain, with the reasons, when there are none."""
    trained = kept(rows)
    if not trained:
        reasons = Counter(r.dropped if r.dropped is not UNSET else "?" for r in rows)
        why = ", ".join(f"{count} x {reason}" for reason, count in reasons.items()) or "no rows at all"
        raise NothingToTrain(f"{label}: nothing to train on ({len(rows)} rows: {why})")
    return trained
