"""Where everything idempo writes lives, and reading it back: the one module that knows the disk layout.

    <trial>/config.yaml             the resolved config
    <trial>/cycles/init/            M_init's evaluation (cycle -1)
    <trial>/cycles/000-seed/        data.jsonl  adapter/  train.json  eval.jsonl  metrics.json  manifest.json
    <trial>/cycles/001/             samples.jsonl  adapter/  train.json  eval.jsonl  metrics.json  manifest.json
    <trial>/cycles/<c>/reeval/      `idempo eval` of that generation, by default
    <trial>/initial-answers.jsonl   M_init's answers to training prompts (preference regimes)
    <trial>/placement.json  stopped.json  summary.json     in a sweep: where it ran, why it stopped, its verdict
    <trial>/progress.json           the stage and phase running now, and since when (`idempo status`)
    <trial>/timeline.json           each phase's wall-clock start and end, every run (idempo.timeline)
    <trial>/.lock                   held by the process running the trial
    <trial>/wandb/                  W&B's runs of an `idempo run --wandb` trial (a sweep's are the sweep's)

    <storage>/<sweep>/sweep.json    the sweep's axes, trials and resolved configs
    <storage>/<sweep>/trials/<trial>/   one trial dir each
    <storage>/<sweep>/shared/<stage>-<key>/   stages several trials share (idempo.shared)
    <storage>/<sweep>/tune/         Ray Tune's state (--resume); a trial's failures in tune/<tune trial>/error.txt
    <storage>/<sweep>/wandb/        W&B's offline runs
    <calibration>/n_seed-<n>/  calibration.json    `idempo calibrate`'s probes and result
    $IDEMPO_CACHE/bench/<host>.json  `idempo bench`'s latest figures on that machine (what cost estimates read)

A cycle is complete when its metrics.json exists; a resumed trial reuses whatever a cycle already
finished, after checking it against the record its dir's manifest.json keeps of it (idempo.records).
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from idempo.artifacts import is_temporary, read_json, write_text
from idempo.cache import idempo_cache_root
from idempo.config import ENDPOINT_PACE, AmplificationConfig, endpoint_sections

INIT_CYCLE, SEED_CYCLE = -1, 0
_LOCK = ".lock"


def stage_cycles(cycles: int) -> list[int]:
    """A trial's stages in the order they run: M_init's evaluation (-1), the seed (0), then cycles 1..C."""
    return [INIT_CYCLE, SEED_CYCLE, *range(1, cycles + 1)]


# Config fields a trial may change between runs: they do not change what the trial has written or will
# write. Besides these, every endpoint section's pace, key source, refusal limit and prices
# (`ENDPOINT_PACE`) and every cache location (`cache_dir`) may change: see `resumable`.
RESUMABLE_CHANGES = {"cycles", "evaluation.amplification"}

# Fields whose default computes otherwise (up to rounding) than idempo did before the field existed, with the
# value a trial made before then ran with: a stored config without the field resumes only with that value.
VALUES_BEFORE_FIELD = {"training.logits_chunk": 0, "sampling.weights": "adapter"}
CACHE_LOCATIONS = {"cache_dir"}
ENDPOINT_SECTIONS = endpoint_sections()


class TrialConflict(RuntimeError):
    """The output dir holds a trial with another config, another process is running it, or it holds
    something that is not a trial."""


def resumable(field: str) -> bool:
    """Whether the dotted config `field` may change when a trial resumes: it cannot change what is written.
    An endpoint's concurrency, timeout, retries, backoff, key variable and prices change how hard it is
    leaned on and what the cost report says, never its answers; a cache location changes where answers are
    kept, not what they are."""
    section, _, name = field.rpartition(".")
    return (
        field in RESUMABLE_CHANGES
        or name in CACHE_LOCATIONS
        or (section in ENDPOINT_SECTIONS and name in ENDPOINT_PACE)
    )


class TrialLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        # M_init's answers, by prompt: the rejected side of preference pairs, written once per trial
        self.initial_answers = self.root / "initial-answers.jsonl"
        self.placement = self.root / "placement.json"  # a sweep trial: where its engines ran
        self.stopped = self.root / "stopped.json"  # a sweep trial: the stopper ended it, and why
        self.summary = self.root / "summary.json"  # a sweep trial: its amplification verdict
        self.wandb = self.root / "wandb"  # `idempo run --wandb`: W&B's run dirs (idempo.tracking)
        self.progress = self.root / "progress.json"  # the stage and phase running now (idempo.status reads it)
        self.timeline = self.root / "timeline.json"  # when each phase ran (idempo.timeline)

    def cycle_dir(self, cycle: int) -> Path:
        name = {INIT_CYCLE: "init", SEED_CYCLE: "000-seed"}.get(cycle, f"{cycle:03d}")
        return self.root / "cycles" / name

    @staticmethod
    def cycle_of(directory: str | Path) -> int | None:
        """The cycle a cycle dir belongs to ('init' -1, '000-seed' 0, '003' 3), None for other dirs."""
        name = Path(directory).name
        if name in ("init", "000-seed"):
            return INIT_CYCLE if name == "init" else SEED_CYCLE
        return int(name) if name.isdigit() else None

    def data(self, cycle: int) -> Path:
        """The training data of a cycle: D_seed for the seed, the samples of M_{j-1} after it."""
        return self.cycle_dir(cycle) / ("data.jsonl" if cycle == SEED_CYCLE else "samples.jsonl")

    def weights(self, cycle: int, finetune: str) -> Path:
        return self.cycle_dir(cycle) / ("adapter" if finetune == "lora" else "model")

    def train_stats(self, cycle: int) -> Path:
        """What training the cycle's generation did (written beside its weights, before metrics.json)."""
        return self.cycle_dir(cycle) / "train.json"

    def eval(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "eval.jsonl"

    @staticmethod
    def reevaluation(weights: Path) -> Path:
        """Where `idempo eval` of a generation's weights writes by default: beside them."""
        return weights.parent / "reeval"

    def metrics(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "metrics.json"

    def is_complete(self, cycle: int) -> bool:
        return self.metrics(cycle).is_file()

    def check(self, config: dict[str, Any]) -> None:
        """Fail if this dir holds a trial with another config (`resumable` fields aside: more `cycles`
        extend it, and the amplification rule only reads what it wrote), or holds anything but a trial."""
        if not self.config.exists():
            foreign = self._foreign_entries()
            if foreign:
                shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 5 else "")
                raise TrialConflict(
                    f"--out {self.root} is not empty and holds no trial (no config.yaml): {shown}; "
                    "use an empty or new dir, or the dir of a trial to resume it"
                )
            return
        try:
            stored = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise TrialConflict(
                f"{self.config}: not YAML ({err}); it is the config of the trial in {self.root}"
            ) from None
        changed = config_differences(stored, config)
        if changed:
            raise TrialConflict(
                f"{self.root} holds a trial with another config ({'; '.join(changed)}); "
                "use another --out dir, or the same config to resume"
            )

    def claim(self, config: dict[str, Any]) -> None:
        """Take the trial dir for this process (the lock first, so a second process is refused before it
        does anything), compare the configs, clear what a killed run left half-written, write the config.
        A dir this call created is removed again when a check fails (`release_fresh`)."""
        created = _missing_parents(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        lock_existed = (self.root / _LOCK).exists()
        self._lock = open(self.root / _LOCK, "a")  # held until the process exits; "a" leaves it untouched
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TrialConflict(f"{self.root} is being run by another process") from None
        self._fresh = [*created, *([] if lock_existed else [self.root / _LOCK])]
        try:
            self.check(config)
        except TrialConflict:
            self.release_fresh()
            self._lock.close()
            raise
        fresh_config = not self.config.exists()
        self.clean_temporary()
        text = yaml.safe_dump(config, sort_keys=False)
        if not (self.config.exists() and self.config.read_text() == text):
            write_text(self.config, text)
        if fresh_config:
            self._fresh.append(self.config)

    def release_fresh(self) -> None:
        """Undo what `claim` created in a dir that held no trial (a failure before the trial wrote anything
        else, e.g. a model that does not load): the next run starts as if this one never did."""
        if self.config in getattr(self, "_fresh", []):
            self.progress.unlink(missing_ok=True)  # what the failed first stage said it was doing, and when
            self.timeline.unlink(missing_ok=True)
        for path in reversed(getattr(self, "_fresh", [])):
            if path == self.config or path.name == _LOCK:
                path.unlink(missing_ok=True)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        self._fresh = []

    def owned_dirs(self) -> list[Path]:
        """The dirs only this trial writes into: its root, cycles/ and each cycle dir (not reeval/ or
        anything else a user put there)."""
        cycles = self.root / "cycles"
        dirs = [self.root, cycles]
        if cycles.is_dir():
            dirs += sorted(d for d in cycles.iterdir() if d.is_dir() and self.cycle_of(d) is not None)
        return [d for d in dirs if d.is_dir()]

    def clean_temporary(self) -> None:
        """Remove what a killed run left half-written: idempo's own temporary names, in the trial's own dirs."""
        for directory in self.owned_dirs():
            for leftover in directory.iterdir():
                if is_temporary(leftover.name):
                    shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()

    def redo_hint(self, path: Path) -> str:
        """How to redo what `path` belongs to: its cycle dir, and every later one (they build on it)."""
        cycles = self.root / "cycles"
        try:
            relative = Path(path).relative_to(cycles)
        except ValueError:  # a file of the trial root: M_init's answers, which every stage after M_init's reads
            later = [d for d in self.owned_dirs()[2:] if self.cycle_of(d) != INIT_CYCLE]
            return (
                f"delete {path} and the cycles that read it ({', '.join(map(str, later)) or 'none yet'}) to redo them"
            )
        directory = cycles / relative.parts[0]
        cycle = self.cycle_of(directory)
        if cycle == INIT_CYCLE:
            return f"delete {directory} to redo M_init's evaluation (cycle -1)"
        later = [d for d in self.owned_dirs()[2:] if self.cycle_of(d) > cycle]
        hint = f"delete {directory} to redo cycle {cycle}"
        if later:
            hint += f"; later cycles, which build on it, must be deleted too: {', '.join(map(str, later))}"
        return hint

    def _foreign_entries(self) -> list[str]:
        """What a dir without config.yaml holds besides the lock, W&B's runs (of a run that stopped before
        its first stage) and idempo's temporary files."""
        if not self.root.is_dir():
            return []
        own = {_LOCK, self.wandb.name}
        return sorted(p.name for p in self.root.iterdir() if p.name not in own and not is_temporary(p.name))


class SweepLayout:
    """A sweep's dir, <storage>/<sweep>: its record, its trials, the stages they share, Tune's and W&B's state."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.record = self.root / "sweep.json"
        self.trials = self.root / "trials"
        self.shared = self.root / "shared"
        self.tune = self.root / "tune"

    def trial(self, name: str) -> Path:
        return self.trials / name

    @staticmethod
    def config_error(tune_trial_dir: str | Path) -> Path:
        """A trial's config error, kept in Tune's own dir of the trial for its retries (idempo.tune)."""
        return Path(tune_trial_dir) / "config-error.json"

    def tune_trials(self) -> dict[str, Path]:
        """Tune's own dir of each trial that Tune has started, by trial name (its params.json names it)."""
        found = {}
        for params in sorted(self.tune.glob("*/params.json"), key=lambda p: p.stat().st_mtime):
            name = read_json(params).get("trial")
            if isinstance(name, str):
                found[name] = params.parent
        return found

    @staticmethod
    def tune_error(tune_trial_dir: str | Path) -> Path:
        """Tune's record of a trial's failures: a 'Failure # n' header and the error, per failure."""
        return Path(tune_trial_dir) / "error.txt"


def bench_records() -> Path:
    """Where `idempo bench` keeps each machine's latest figures, `<host>.json`; cost estimates read them."""
    return idempo_cache_root() / "bench"


def calibration_probe(out: Path, n_seed: int) -> Path:
    """`idempo calibrate`'s trial of one n_seed (an ordinary trial dir with 0 cycles)."""
    return out / f"n_seed-{n_seed}"


def calibration_record(out: Path) -> Path:
    return out / "calibration.json"


@dataclass
class TrialResult:
    name: str
    directory: Path
    config: dict[str, Any]  # the resolved config, as config.yaml holds it
    axes: dict[str, Any]  # this trial's values of the sweep's axes
    history: list[dict]  # metrics.json of the completed cycles, by cycle (-1 = M_init, 0 = M_seed)
    stopped: dict | None  # {"cycle", "reason"} when the stopper ended the trial

    @property
    def planned_cycles(self) -> int:
        return int(self.config.get("cycles", 0))

    @property
    def last_cycle(self) -> int | None:
        return self.history[-1]["cycle"] if self.history else None

    @property
    def status(self) -> str:
        """complete, stopped, partial (running or interrupted) or not started (no config.yaml yet)."""
        if self.stopped:
            return "stopped"
        if not self.config:
            return "not started"
        done = self.last_cycle is not None and self.last_cycle >= self.planned_cycles
        return "complete" if done else "partial"

    @property
    def persona(self) -> str:
        return str(self.config.get("persona", "?"))

    @property
    def regime(self) -> str:
        return str(self.config.get("regime", "sft"))

    def amplification_settings(self, overrides: dict[str, Any] | None = None) -> AmplificationConfig:
        own = (self.config.get("evaluation") or {}).get("amplification") or {}
        return AmplificationConfig(**{**own, **(overrides or {})})

    def value(self, key: str) -> Any:
        """A config field by its dotted name."""
        return dotted_get(self.config, key)


def read_trial(directory: Path) -> TrialResult:
    """A trial as its artifacts say it is now: the completed cycles' metrics (running trials too)."""
    layout = TrialLayout(directory)
    config = yaml.safe_load(layout.config.read_text()) if layout.config.exists() else {}
    history = []
    cycles_dir = directory / "cycles"
    if cycles_dir.is_dir():
        for cycle_dir in cycles_dir.iterdir():
            cycle = TrialLayout.cycle_of(cycle_dir)
            if cycle is not None and layout.is_complete(cycle):
                history.append(read_json(layout.metrics(cycle)))
    history.sort(key=lambda m: m["cycle"])
    stopped = read_json(layout.stopped) if layout.stopped.exists() else None
    return TrialResult(directory.name, directory, config, {}, history, stopped)


def dotted_get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _missing_parents(path: Path) -> list[Path]:
    """The dirs `path.mkdir(parents=True)` would create, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing[::-1]


def config_differences(old: Any, new: Any, allowed: Callable[[str], bool] = resumable, prefix: str = "") -> list[str]:
    """'field: old -> new' for every field that differs, except the dotted fields `allowed` accepts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for key in sorted(set(old) | set(new)):
            # a key the stored config lacks was added to idempo after the trial began: its default keeps
            # the trial as it was, so resuming it is not a change, unless the default computes otherwise
            field = f"{prefix}{key}"
            if allowed(field) or (key not in old and field not in VALUES_BEFORE_FIELD):
                continue
            changed += config_differences(
                old.get(key, VALUES_BEFORE_FIELD.get(field)), new.get(key), allowed, f"{field}."
            )
        return changed
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
