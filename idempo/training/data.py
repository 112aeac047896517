"""Which rows of a stage's data a generation trains on, and why the others were left out.

Every row the stage produced stays in its data file (`data.jsonl`, `samples.jsonl`); a row left out
carries `kept: false` and a `dropped` reason, so the record is complete and the counts in metrics.json
can be checked against it. Empty answers are always left out (the authors' code drops them too): a
gradient step towards "say nothing" is not the self-training the experiment studies.
"""

from __future__ import annotations

from collections import Counter

EMPTY_ANSWER = "empty answer"
EMPTY_REJECTED = "empty rejected answer"


class NothingToTrain(RuntimeError):
    """A generation would train on no data (or no tokens): an error, never a finished cycle."""


def drop(row: dict, reason: str) -> dict:
    return {**row, "kept": False, "dropped": reason}


def drop_empty(rows: list[dict]) -> list[dict]:
    """Rows whose answer (or, for preference pairs, rejected answer) is blank are marked as dropped."""
    marked = []
    for row in rows:
        if not row.get("kept", True):
            marked.append(row)
        elif not row["response"].strip():
            marked.append(drop(row, EMPTY_ANSWER))
        elif "rejected" in row and not row["rejected"].strip():
            marked.append(drop(row, EMPTY_REJECTED))
        else:
            marked.append(row)
    return marked


def kept(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("kept", True)]


def data_summary(rows: list[dict]) -> dict:
    """metrics.json's `data`: rows trained on, rows left out by reason, rows mixed in from D_seed."""
    trained = kept(rows)
    summary = {
        "n": len(trained),
        "mean_words": sum(len(r["response"].split()) for r in trained) / max(1, len(trained)),
        "dropped": dict(Counter(r["dropped"] for r in rows if not r.get("kept", True))),
    }
    mixed = sum(r.get("source") == "d_seed" for r in trained)
    if mixed:
        summary["from_d_seed"] = mixed
    return summary


def require_data(rows: list[dict], label: str) -> list[dict]:
    """The rows to train on; NothingToTrain, with the reasons, when there are none."""
    trained = kept(rows)
    if not trained:
        reasons = Counter(r.get("dropped", "?") for r in rows)
        why = ", ".join(f"{count} x {reason}" for reason, count in reasons.items()) or "no rows at all"
        raise NothingToTrain(f"{label}: nothing to train on ({len(rows)} rows: {why})")
    return trained
