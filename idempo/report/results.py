"""A sweep's results, read back from its artifacts alone: works while the sweep is still running.

A trial's completed cycles are the `metrics.json` files that exist (they are written atomically, so a
cycle in progress is simply absent); `stopped.json` says the coherence floor ended it. The sweep's axes
come from the `sweep.json` that `idempo sweep` writes, or, for a dir without one, from the config fields
whose values differ between trials. An `idempo run` dir reads as a sweep of one trial; several dirs read
as one sweep with one more axis, `sweep`, whose values name the dirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from idempo.artifacts import read_json
from idempo.config import ConfigError
from idempo.evaluation.stats import mean_ci
from idempo.layout import INIT_CYCLE, SEED_CYCLE, SweepLayout, TrialLayout, TrialResult, dotted_get, read_trial

# Trials that differ only in these are replicas of one configuration.
REPLICA_AXES = ("seed", "seeding.seed")
SWEEP_AXIS = "sweep"  # the axis that tells the dirs of a report of several apart


@dataclass
class SweepResults:
    name: str
    directory: Path
    axes: dict[str, list[Any]]
    trials: list[TrialResult]
    wandb: dict[str, Any] | None  # the sweep's W&B settings, when sweep.json has them
    sources: list[Path] = field(default_factory=list)  # the dirs read: one, or one per sweep
    kind: str = "sweep"  # sweep, trial (an `idempo run` dir) or sweeps (several dirs)

    @property
    def config_keys(self) -> set[str]:
        return {key for trial in self.trials for key in flat_config(trial.config)} | set(self.axes)

    def varying(self) -> dict[str, list[Any]]:
        """The axes whose value differs between trials, replica axes aside: a constant one says nothing."""
        varying = {}
        for axis in self.axes:
            values = distinct(axis_value(t, axis) for t in self.trials)
            if axis not in REPLICA_AXES and len(values) > 1:
                varying[axis] = sorted(values, key=sort_key)
        return varying

    def replica_groups(self) -> dict[tuple, list[TrialResult]]:
        """Trials keyed by their non-replica axis values; each group's trials differ only in seed."""
        groups: dict[tuple, list[TrialResult]] = {}
        for trial in self.trials:
            key = tuple((axis, trial.axes.get(axis)) for axis in self.axes if axis not in REPLICA_AXES)
            groups.setdefault(key, []).append(trial)
        return groups


def load_results(directories: str | Path | list[str | Path]) -> SweepResults:
    """Every trial of a sweep dir, or of an `idempo run` dir, or of several (with the axis `sweep`)."""
    if isinstance(directories, str | Path):
        directories = [directories]
    paths = [Path(d).expanduser().resolve() for d in directories]
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:
        raise ConfigError([f"report: {', '.join(repeated)} given more than once"])
    parts = [_load_one(p) for p in paths]
    return parts[0] if len(parts) == 1 else _combine(parts)


def _load_one(directory: Path) -> SweepResults:
    """Every trial under <sweep dir>/trials, with the sweep's axes; or the one trial of an `idempo run` dir."""
    layout = SweepLayout(directory)
    trials_dir = layout.trials
    if not trials_dir.is_dir() and not layout.record.exists():
        if TrialLayout(directory).config.exists():
            return SweepResults(directory.name, directory, {}, [read_trial(directory)], None, [directory], "trial")
        raise ConfigError([f"sweep dir: {directory} has no trials/ and no config.yaml (give a sweep's or a run's dir)"])
    record = read_json(layout.record) if layout.record.exists() else {}
    started = sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []
    names = list(record.get("trials", {}))  # the sweep's order; planned trials that have not started too
    names += [d.name for d in started if (d / "config.yaml").exists() and d.name not in names]
    trials = [read_trial(trials_dir / name) for name in names]
    if not trials:
        raise ConfigError([f"sweep dir: {directory} has no trial with a config.yaml yet"])
    if record.get("axes") is not None:
        axes = {key: list(values) for key, values in record["axes"].items()}
        for trial in trials:
            trial.axes = dict(record.get("trials", {}).get(trial.name) or {k: trial.value(k) for k in axes})
    else:
        axes = _varying_fields(trials)
        for trial in trials:
            trial.axes = {key: trial.value(key) for key in axes}
    return SweepResults(record.get("name", directory.name), directory, axes, trials, record.get("wandb"), [directory])


def _combine(parts: list[SweepResults]) -> SweepResults:
    """Several sweeps as one: the sweep is an axis, named by each sweep's name (by its dir, relative to the
    dirs' common parent, where two share a name); trial names take the same prefix so they stay apart."""
    names = [part.name for part in parts]
    root = Path(os.path.commonpath([part.directory for part in parts]))
    labels = [
        name if names.count(name) == 1 else str(part.directory.relative_to(root))
        for name, part in zip(names, parts, strict=True)
    ]
    axes: dict[str, list[Any]] = {SWEEP_AXIS: labels}
    for part in parts:
        for axis, values in part.axes.items():
            axes[axis] = distinct([*axes.get(axis, []), *values])
    trials = []
    for label, part in zip(labels, parts, strict=True):
        for trial in part.trials:
            trial.name = f"{label}/{trial.name}"
            trial.axes = {SWEEP_AXIS: label} | {a: trial.axes.get(a, trial.value(a)) for a in axes if a != SWEEP_AXIS}
            trials.append(trial)
    return SweepResults(" + ".join(labels), root, axes, trials, None, [p.directory for p in parts], "sweeps")


def axis_value(trial: TrialResult, axis: str) -> Any:
    """A trial's value of a sweep axis, or of any config field."""
    return trial.axes[axis] if axis in trial.axes else trial.value(axis)


def distinct(values) -> list[Any]:
    """Each value once, in order (axis values may be lists or dicts, which do not hash)."""
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def sort_key(value: Any) -> tuple:
    """Values in their natural order: numbers numerically, before text."""
    return (0, value, "") if isinstance(value, int | float) and not isinstance(value, bool) else (1, 0, str(value))


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def series(
    trial: TrialResult, metric: str, first_cycle: int = SEED_CYCLE
) -> list[tuple[int, float, float | None, float | None]]:
    """(cycle, mean, ci low, ci high) of a metric (dotted: 'degeneration.distinct_2') with its 95% interval
    (None, None where it has none), from `first_cycle` on."""
    points = []
    for metrics in trial.history:
        value = dotted_get(metrics, metric)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = {"mean": value}
        if metrics["cycle"] < first_cycle or not isinstance(value, dict) or value.get("mean") is None:
            continue
        low, high = value.get("ci95") or [None, None]
        points.append((metrics["cycle"], value["mean"], low, high))
    return points


def lowest(trial: TrialResult, metric: str, first_cycle: int = SEED_CYCLE) -> float | None:
    return min((mean for _, mean, _, _ in series(trial, metric, first_cycle)), default=None)


def _varying_fields(trials: list[TrialResult]) -> dict[str, list[Any]]:
    flats = [flat_config(t.config) for t in trials]
    values = {key: distinct(flat.get(key) for flat in flats) for key in sorted({k for flat in flats for k in flat})}
    return {key: found for key, found in values.items() if len(found) > 1}


class Point(NamedTuple):
    """One cycle of a line: the mean, its 95% interval and which interval that is."""

    cycle: int
    mean: float
    low: float | None
    high: float | None
    n: int  # replicas behind the mean
    interval: str | None  # ACROSS_REPLICAS, WITHIN_TRIAL or None (no interval)


ACROSS_REPLICAS = "across replicas"  # Student-t over the replicas' means, n-1 degrees of freedom
WITHIN_TRIAL = "within trial"  # one trial's own interval over its eval answers, clustered by prompt


def aggregate(trials: list[TrialResult], metric: str) -> list[Point]:
    """A metric over replicas, per cycle: their mean with a t-interval across replicas; no interval for a
    cycle only one reached (one replica says nothing of the spread); a shared evaluation (the same numbers
    in every trial) or a single trial keeps its own within-trial interval (docs/metrics.md, "Confidence
    intervals"). `interval` says which."""
    by_cycle: dict[int, list[tuple[float, float | None, float | None]]] = {}
    for trial in trials:
        for cycle, mean, low, high in series(trial, metric, INIT_CYCLE):
            by_cycle.setdefault(cycle, []).append((mean, low, high))
    points = []
    for cycle, values in sorted(by_cycle.items()):
        if len(trials) == 1 or (len(values) > 1 and len(set(values)) == 1):
            mean, low, high = values[0]
            points.append(Point(cycle, mean, low, high, 1, None if low is None else WITHIN_TRIAL))
            continue
        summary = mean_ci([mean for mean, _, _ in values])
        low, high = summary["ci95"]
        points.append(Point(cycle, summary["mean"], low, high, summary["n"], None if low is None else ACROSS_REPLICAS))
    return points
