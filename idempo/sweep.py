"""Sweep files: a base experiment config, grid axes, replicas, and how to run the grid on Ray.

    name: sft-personas
    base: smoke.yaml                 # an experiment config, relative to this file (or `config:` inline)
    config: {cycles: 4}              # overrides on top of base
    axes:                            # any config field, dotted; the full grid is run
      n_sampled: [32, 64]
      init: [initial, previous]
    replicas: 2                      # seeds 0..1 (or a list of seeds): sets `seed`
    retrain_seed_model: false        # true: each replica also sets seeding.seed, so retrains its own M_seed
    run:
      storage_path: runs/sweeps
      resources: {cpus: 1, gpus: 0}
      max_failures: 1
      stop: {metric: coherence.mean, floor: 30, grace_cycles: 2}
      wandb: {project: idempo}

Every trial's resolved config is validated before Ray starts; all problems are reported at once with
the trial they belong to.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from idempo.artifacts import read_json
from idempo.config import ConfigError, ExperimentConfig, Section, config_from_dict, describe_error, read_yaml_mapping
from idempo.layout import INIT_CYCLE, RESUMABLE_CHANGES, SEED_CYCLE, SweepLayout, config_differences, resumable
from idempo.shared import STAGES, stage_groups


class Resources(Section):
    """What one trial asks of the cluster. With GPUs, the trial's engines run as an actor in a bundle of
    their own; the trial driver takes one CPU beside it."""

    cpus: float = Field(1.0, gt=0, description="CPUs for the trial's engines (the bundle that trains and samples).")
    gpus: float = Field(
        0.0,
        ge=0,
        description="GPUs for the trial's engines; 0 runs everything on CPUs; a fraction 1/k of one (0.5, 0.25) "
        "lets k trials share a GPU, so one trains while another samples.",
    )

    @field_validator("gpus")
    @classmethod
    def _whole_or_share(cls, value: float) -> float:
        if value > 1 and value != int(value) or 0 < value < 1 and abs(1 / value - round(1 / value)) > 1e-3:
            raise ValueError(
                "allowed: 0, a whole number of GPUs, or a share 1/k of one GPU (0.5, 0.25, 0.2, ...) "
                "that k trials fill exactly"
            )
        return value


class StopSettings(Section):
    """End a trial whose metric falls under `floor` once `grace_cycles` cycles have run."""

    metric: str = Field("coherence.mean", description="Dotted path into a cycle's metrics.json.")
    floor: float = Field(description="The trial stops once its metric is below this (after the grace cycles).")
    grace_cycles: int = Field(2, ge=0, description="Cycles (after the seed) before the floor applies.")


class WandbSettings(Section):
    """Where the sweep's trials log: one W&B run per trial, grouped by the sweep."""

    project: str = Field("idempo", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); null: your default.")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="auto: online when W&B has credentials (WANDB_API_KEY, or `wandb login`), else offline "
        "(sync later with `wandb sync`).",
    )
    upload_artifacts: bool = Field(
        False,
        description="Upload each generation's weights and D_seed to W&B; false: log them as references to "
        "their files in storage_path.",
    )


class RunSettings(Section):
    storage_path: str = Field("runs/sweeps", description="Where trials and Tune state go; shared storage on clusters.")
    resources: Resources = Field(Resources(), description="What one trial asks of the cluster.")
    max_failures: int = Field(1, ge=0, description="Retries of a failed trial, from its last completed cycle.")
    max_concurrent_trials: int | Literal["auto"] = Field(
        "auto",
        description="auto: as many as the cluster's GPUs hold at each trial's share (two per GPU at gpus 0.5), "
        "or its CPUs for CPU trials.",
    )
    stop: StopSettings | None = Field(None, description="Stop trials whose metric falls under a floor; null: never.")
    wandb: WandbSettings = Field(WandbSettings(), description="Where the trials log to W&B.")

    @field_validator("storage_path")
    @classmethod
    def _filesystem(cls, value: str) -> str:
        if "://" in value:
            raise ValueError(
                "must be a filesystem path every node mounts (NFS, EFS, ...): trial artifacts are written "
                "with atomic renames, which object stores do not offer"
            )
        return value

    @field_validator("max_concurrent_trials")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be at least 1, or 'auto'")
        return value


class SweepFile(Section):
    name: str = Field(description="The sweep's name: its dir under storage_path and its W&B group.")
    base: str | None = Field(None, description="An experiment config file, relative to the sweep file.")
    config: dict[str, Any] = Field(default_factory=dict, description="Config keys set on top of base.")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted config field -> values.")
    replicas: int | list[int] = Field(1, description="A count (seeds 0..n-1) or a list of seeds.")
    retrain_seed_model: bool = Field(
        False,
        description="false: trials whose seed stage reads the same inputs share one M_seed, trained once "
        "(replicas share it: seeding.seed is fixed); true: each replica's seed also sets seeding.seed and "
        "every trial trains its own M_seed (the authors' Figure 14 comparison).",
    )
    run: RunSettings = Field(RunSettings(), description="How the grid runs on Ray: storage, resources, retries.")

    @field_validator("name")
    @classmethod
    def _dir_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", value):
            raise ValueError("must be a plain name (letters, digits, '.', '_', '-')")
        return value

    @field_validator("axes")
    @classmethod
    def _distinct_values(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [key for key, values in value.items() if not values]
        if empty:
            raise ValueError(f"axes {empty} have no values")
        for key, values in value.items():
            repeated = _repeated(values)
            if repeated:
                raise ValueError(f"{key} lists {repeated[0]!r} more than once; each value is one trial")
        return value

    @field_validator("replicas")
    @classmethod
    def _seeds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (a count), or a non-empty list of seeds")
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list runs no trial; allowed: a count >= 1 or a non-empty list of seeds")
            repeated = _repeated(value)
            if repeated:
                raise ValueError(f"seed {repeated[0]} appears more than once; each replica needs its own seed")
        return value

    @model_validator(mode="after")
    def _replicas(self) -> SweepFile:
        if "seed" in self.axes and self.replicas != 1:
            raise ValueError("give seeds either as the 'seed' axis or as replicas, not both")
        if self.retrain_seed_model and "seeding.seed" in self.axes:
            raise ValueError("retrain_seed_model sets seeding.seed from each replica's seed; drop the axis")
        if self.retrain_seed_model and self.replicas == 1 and "seed" not in self.axes:
            raise ValueError("retrain_seed_model needs replicas (or a 'seed' axis)")
        return self


@dataclass(frozen=True)
class TrialSpec:
    name: str  # deterministic from the axis values: a retried or restored trial finds its own dir
    axes: dict[str, Any]
    config: ExperimentConfig


@dataclass(frozen=True)
class Sweep:
    name: str
    file: Path
    run: RunSettings
    trials: list[TrialSpec]
    axes: dict[str, list[Any]]  # as expanded: replicas appear as the `seed` axis
    retrain_seed_model: bool = False

    @property
    def shared_cycles(self) -> tuple[int, ...]:
        """The stages trials with equal inputs share (idempo.shared): M_init's evaluation, and M_seed unless
        every replica retrains its own."""
        return (INIT_CYCLE,) if self.retrain_seed_model else (INIT_CYCLE, SEED_CYCLE)

    def stage_groups(self) -> dict[str, dict[str, list[str]]]:
        """For each shared stage, the trials that share each run of it (keyed by the stage's key)."""
        configs = {t.name: t.config for t in self.trials}
        return {STAGES[cycle]: stage_groups(configs, cycle) for cycle in self.shared_cycles}

    def run_order(self) -> list[str]:
        """Trial names in the order Ray Tune starts them: the first trial of every seed group before any
        second one, so that concurrent trials train distinct M_seeds instead of waiting for one; then one
        replica of every configuration before the next replica of any, so that a sweep stopped early
        holds the whole grid at least once."""
        groups = self.stage_groups().get("seed") or {t.name: [t.name] for t in self.trials}
        first = {members[0] for members in groups.values()}
        seeds = self.axes.get("seed", [None])
        replica = {t.name: seeds.index(t.axes["seed"]) if "seed" in t.axes else 0 for t in self.trials}
        position = {t.name: i for i, t in enumerate(self.trials)}
        return sorted(position, key=lambda name: (name not in first, replica[name], position[name]))

    @property
    def storage(self) -> Path:
        """storage_path, absolute (a relative one is relative to where `idempo sweep` runs)."""
        return Path(self.run.storage_path).expanduser().resolve()

    @property
    def directory(self) -> Path:
        """<storage>/<sweep>: trials/, Tune's state, W&B's offline runs and sweep.json."""
        return self.storage / self.name

    @property
    def layout(self) -> SweepLayout:
        return SweepLayout(self.directory)

    def trial_dir(self, name: str) -> Path:
        return self.layout.trial(name)

    def record(self) -> dict[str, Any]:
        """What `idempo report` needs to know of the sweep beyond its trials' own artifacts."""
        return {
            "name": self.name,
            "file": str(self.file),
            "axes": self.axes,
            "trials": {t.name: t.axes for t in self.trials},
            "configs": {t.name: t.config.to_dict() for t in self.trials},  # what a --resume is compared with
            "wandb": self.run.wandb.model_dump(),
            "retrain_seed_model": self.retrain_seed_model,
            "shared_stages": self.stage_groups(),
        }


def changes_since_recorded(sweep: Sweep) -> list[str]:
    """How `sweep` differs from the sweep.json its first run recorded: trials added or removed, and each
    trial's changed config fields (keys an idempo release added since are not changes). Empty when nothing
    is recorded yet."""
    path = sweep.layout.record
    if not path.exists():
        return []
    record = read_json(path)
    old = record.get("configs") or {name: None for name in record.get("trials", {})}
    new = {t.name: t.config.to_dict() for t in sweep.trials}
    changes = []
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if added:
        changes.append(f"trials added: {', '.join(added)}")
    if removed:
        changes.append(f"trials removed: {', '.join(removed)}")
    for name in sorted(set(old) & set(new)):
        if old[name] is not None:
            changes += [f"trial {name}: {c}" for c in config_differences(old[name], new[name], _resumable_in_sweep)]
    return changes


def _resumable_in_sweep(field: str) -> bool:
    """What a resumed sweep may change: what a trial may (an endpoint's pace, a cache location), except
    `cycles` and the amplification rule: Tune's restored state does not rerun a finished trial for them."""
    return resumable(field) and field not in RESUMABLE_CHANGES


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file, expand its grid, validate every trial's config (all problems at once)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep")
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError([describe_error(e, SweepFile) for e in err.errors()], source=str(path)) from None

    base = read_yaml_mapping(path.parent / sweep.base, "base config") if sweep.base is not None else {}
    base = _merge(base, sweep.config)

    axes = dict(sweep.axes)
    if sweep.replicas != 1:  # replicas differ only in the cycles' seed (seeding.seed is shared)
        axes["seed"] = list(range(sweep.replicas)) if isinstance(sweep.replicas, int) else list(sweep.replicas)
    trials, problems = [], []
    keys = list(axes)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(axes[k] for k in keys))]
    for point, name in zip(points, trial_names(points), strict=True):
        data = yaml.safe_load(yaml.safe_dump(base))  # a deep copy through plain types
        try:
            for key, value in point.items():
                _set_path(data, key, value, f"axes.{key}")
            if sweep.retrain_seed_model and "seed" in point:
                _set_path(data, "seeding.seed", point["seed"], "retrain_seed_model")
            config = config_from_dict(_relative_paths(data, path.parent), source=name)
        except ConfigError as err:
            problems += [f"trial {name}: {p}" for p in err.problems]
            continue
        trials.append(TrialSpec(name, point, config))
    if problems:
        raise ConfigError(problems, source=str(path))
    return Sweep(sweep.name, path.resolve(), sweep.run, trials, axes, sweep.retrain_seed_model)


_NAME_LENGTH = 180  # a trial dir's name; with its parents it stays well inside PATH_MAX


def trial_name(point: dict[str, Any]) -> str:
    """'n_sampled=32,init=previous' -> 'n_sampled-32_init-previous' (the base config alone: 'base')."""
    if not point:
        return "base"
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in point.items()]
    return re.sub(r"[^\w.-]+", "", "_".join(parts).replace("/", "-"))


def trial_names(points: list[dict[str, Any]]) -> list[str]:
    """Each point's `trial_name`, unique: a name that two points share once sanitised (axes 'a.lr' and
    'b.lr', values 'x/y' and 'x-y') or that is cut to its length limit ends in a hash of the point, so that
    no two trials ever share a dir. Names that need neither stay as they are (a resumed sweep finds them)."""
    names = [trial_name(point) for point in points]
    counts = {name: names.count(name) for name in names}
    unique = []
    for point, name in zip(points, names, strict=True):
        if counts[name] > 1 or len(name) > _NAME_LENGTH:
            digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:10]
            name = f"{name[: _NAME_LENGTH - 11]}-{digest}"
        unique.append(name)
    return unique


def _set_path(data: dict[str, Any], dotted: str, value: Any, field: str) -> None:
    *sections, last = dotted.split(".")
    for depth, part in enumerate(sections):
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            through = ".".join(sections[: depth + 1])
            raise ConfigError([f"{field}: {through} is {data!r}, not a section; {dotted} cannot be set"])
    data[last] = value


def _repeated(values: list[Any]) -> list[Any]:
    """The values that appear more than once (1 and 1.0 count as one value: they configure the same trial)."""
    seen, repeated = [], []
    for value in values:
        (repeated if value in seen else seen).append(value)
    return repeated


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _relative_paths(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Relative file paths in a sweep's configs are relative to the sweep file, not to where it runs."""
    for section, key in (("seeding", "path"), ("prompts", "train"), ("prompts", "eval")):
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str) and value not in ("builtin", "persona") and not Path(value).is_absolute():
            data[section][key] = str((directory / value).resolve())
    persona = data.get("persona")
    if isinstance(persona, str) and persona.endswith((".yaml", ".yml")) and not Path(persona).is_absolute():
        data["persona"] = str((directory / persona).resolve())
    return data
