"""When each phase of a trial ran, by the wall clock, and how busy that kept a GPU.

A trial's `timeline.json` lists its phases in the order they began, each with its stage (`cycle`), its name
(`seed data`, `sample`, `sleep`, `train`, `eval`, `judge`), whether it works on the GPU (`gpu`), and its
`start` and `end` in seconds since the epoch (`end` null while it runs, or where a killed run left it). A
phase is on the list from its start, so that another process can see it running. Every run of the trial
adds to the list; the file is rewritten whole and atomically at each change. Trials that share a GPU can
be laid over each other afterwards: `busy_share` is the fraction of the wall time in which at least one
of them was in a GPU phase.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from idempo.artifacts import read_json, write_json

# Phases whose work runs on the trial's engines (sampling, training, evaluating with M_init or a generation);
# `sleep` moves memory and `judge` waits on an endpoint.
GPU_PHASES = frozenset({"seed data", "sample", "train", "eval"})


class PhaseTimeline:
    """The phases of one trial, kept in `path` as they begin and end."""

    def __init__(self, path: Path):
        self.path = path
        self.phases: list[dict] | None = None  # read at the first phase: a trial found done writes nothing

    @contextmanager
    def phase(self, cycle: int, name: str, gpu: bool | None = None) -> Iterator[None]:
        if self.phases is None:
            self.phases = read_phases(self.path)
        entry = {"cycle": cycle, "phase": name, "gpu": name in GPU_PHASES if gpu is None else gpu}
        self.phases.append(entry | {"start": round(time.time(), 6), "end": None})
        entry = self.phases[-1]
        write_json(self.path, {"phases": self.phases})
        try:
            yield
        finally:
            entry["end"] = round(time.time(), 6)
            if self.path.exists():  # gone: a new trial dir whose first stage failed was released meanwhile
                write_json(self.path, {"phases": self.phases})


def read_phases(path: Path) -> list[dict]:
    """A timeline's phases; none where the file is missing or unreadable (it records time, not results)."""
    try:
        phases = read_json(path)["phases"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return phases if isinstance(phases, list) else []


def gpu_intervals(phases: list[dict]) -> list[tuple[float, float]]:
    """The (start, end) of each finished GPU phase."""
    return [(p["start"], p["end"]) for p in phases if p.get("gpu") and p.get("end") is not None]


def busy_share(timelines: list[list[dict]]) -> float | None:
    """The fraction of the wall time, from the first phase's start to the last phase's end over all
    `timelines` (the trials of one GPU), in which at least one of them was in a GPU phase; None when no
    phase finished."""
    finished = [p for phases in timelines for p in phases if p.get("end") is not None]
    if not finished:
        return None
    wall = max(p["end"] for p in finished) - min(p["start"] for p in finished)
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(interval for phases in timelines for interval in gpu_intervals(phases)):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / wall if wall > 0 else None


def overlaps(first: list[dict], second: list[dict], phases: tuple[set[str], set[str]]) -> list[tuple[float, float]]:
    """The intervals in which `first` was in one of `phases[0]` while `second` was in one of `phases[1]`."""
    found = []
    for a in first:
        for b in second:
            if a["phase"] in phases[0] and b["phase"] in phases[1] and None not in (a["end"], b["end"]):
                start, end = max(a["start"], b["start"]), min(a["end"], b["end"])
                if start < end:
                    found.append((start, end))
    return sorted(found)
