"""A sweep's results, read back from its artifacts alone: works while the sweep is still running.

A trial's completed cycles are the `metrics.json` files that exist (they are written atomically, so a
cycle in progress is simply absent); `stopped.json` says the coherence floor ended it. The sweep's axes
come from the `sweep.json` that `idempo sweep` writes, or, for a dir without one, from the config fields
whose values differ between trials.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from idempo.artifacts import read_json
from idempo.config import ConfigError
from idempo.evaluation.stats import mean_ci
from idempo.layout import SEED_CYCLE, SweepLayout, TrialResult, read_trial

# Trials that differ only in these are replicas of one configuration.
REPLICA_AXES = ("seed", "seeding.seed")


@dataclass
class SweepResults:
    name: str
    directory: Path
    axes: dict[str, list[Any]]
    trials: list[TrialResult]
    wandb: dict[str, Any] | None  # the sweep's W&B settings, when sweep.json has them

    @property
    def config_keys(self) -> set[str]:
        return {key for trial in self.trials for key in flat_config(trial.config)}

    def replica_groups(self) -> dict[tuple, list[TrialResult]]:
        """Trials keyed by their non-replica axis values; each group's trials differ only in seed."""
        groups: dict[tuple, list[TrialResult]] = {}
        for trial in self.trials:
            key = tuple((axis, trial.axes.get(axis)) for axis in self.axes if axis not in REPLICA_AXES)
            groups.setdefault(key, []).append(trial)
        return groups


def load_results(directory: str | Path) -> SweepResults:
    """Every trial under <sweep dir>/trials, with the sweep's axes."""
    directory = Path(directory).expanduser().resolve()
    layout = SweepLayout(directory)
    trials_dir = layout.trials
    if not trials_dir.is_dir() and not layout.record.exists():
        raise ConfigError([f"sweep dir: {directory} has no trials/ (give <storage_path>/<sweep name>)"])
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
    return SweepResults(record.get("name", directory.name), directory, axes, trials, record.get("wandb"))


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
    """(cycle, mean, ci low, ci high) of a metric with its 95% interval (None, None where it has none),
    from `first_cycle` on."""
    points = []
    for metrics in trial.history:
        value = metrics.get(metric)
        if metrics["cycle"] < first_cycle or not isinstance(value, dict) or value.get("mean") is None:
            continue
        low, high = value.get("ci95") or [None, None]
        points.append((metrics["cycle"], value["mean"], low, high))
    return points


def _varying_fields(trials: list[TrialResult]) -> dict[str, list[Any]]:
    flats = [flat_config(t.config) for t in trials]
    keys = sorted({k for flat in flats for k in flat})
    axes = {}
    for key in keys:
        values = []
        for flat in flats:
            if flat.get(key) not in values:
                values.append(flat.get(key))
        if len(values) > 1:
            axes[key] = values
    return axes


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
        for cycle, mean, low, high in series(trial, metric):
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
