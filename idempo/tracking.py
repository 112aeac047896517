"""Weights & Biases: one run per trial, grouped by sweep, with the cycle as x-axis.

The run id is derived from (sweep, trial), so a trial retried, resumed or run again continues its run
and logs each cycle once; `<sweep>/wandb/idempo-<id>.json` records which cycles each run dir holds.
Offline, unsynced run dirs are replaced by one that re-logs every completed cycle from the trial's
metrics.json files (docs/cluster.md, "W&B").
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from idempo.artifacts import read_json, write_json
from idempo.config import ExperimentConfig


def flatten(metrics: dict, prefix: str = "") -> dict:
    """Nested metrics as 'a/b' keys with numbers, strings and booleans; a 95% interval as _low/_high."""
    flat: dict = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif key == "ci95" and isinstance(value, list) and len(value) == 2:
            flat[f"{name}_low"], flat[f"{name}_high"] = value
        elif isinstance(value, bool | int | float | str) or value is None:
            flat[name] = value
    return flat


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def run_id(sweep: str, trial: str) -> str:
    return hashlib.sha256(f"{sweep}/{trial}".encode()).hexdigest()[:16]


class LoggedCycles:
    """Which cycles of a trial each of its W&B run dirs holds ('online' for the server's run)."""

    def __init__(self, runs_dir: Path, identity: str):
        self.runs_dir, self.identity = runs_dir, identity
        self.path = runs_dir / f"idempo-{identity}.json"
        self.dirs: dict[str, list[int]] = read_json(self.path)["dirs"] if self.path.exists() else {}

    def logged(self) -> set[int]:
        return {cycle for cycles in self.dirs.values() for cycle in cycles}

    def drop_unsynced_offline_dirs(self) -> None:
        """Remove the trial's offline run dirs that `wandb sync` has not uploaded: the new run dir re-logs
        their cycles from the trial's artifacts."""
        for run_dir in self.runs_dir.glob(f"offline-run-*-{self.identity}*"):  # W&B adds "-1" to a taken name
            if not (run_dir / f"run-{self.identity}.wandb.synced").exists():
                shutil.rmtree(run_dir)
                self.dirs.pop(run_dir.name, None)
        self.dirs = {
            name: cycles for name, cycles in self.dirs.items() if name == "online" or (self.runs_dir / name).exists()
        }
        self._save()

    def add(self, run_dir: str, cycle: int) -> None:
        self.dirs.setdefault(run_dir, []).append(cycle)
        self._save()

    def _save(self) -> None:
        write_json(self.path, {"run_id": self.identity, "dirs": self.dirs})


class Tracker:
    """A trial's W&B run; `log` each cycle's metrics (a cycle the run already holds is skipped), `finish`
    with the trial's summary."""

    def __init__(self, settings, sweep: str, trial: str, config: ExperimentConfig, directory: Path):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode(settings.mode)
        identity = run_id(sweep, trial)
        self.cycles = LoggedCycles(directory / "wandb", identity)
        if mode == "offline":
            self.cycles.drop_unsynced_offline_dirs()
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=sweep,
            name=trial,
            id=identity,
            resume="allow",
            tags=[config.persona, config.regime],
            config=config.to_dict(),  # endpoint keys live in the environment, never in the config
            dir=str(directory),
            mode=mode,
        )
        self.run.define_metric("cycle")
        self.run.define_metric("*", step_metric="cycle")
        self.run_dir = Path(self.run.dir).parent.name if mode == "offline" else "online"
        self.logged = self.cycles.logged()

    def log(self, metrics: dict) -> None:
        if metrics["cycle"] in self.logged:
            return
        self.run.log(flatten({k: v for k, v in metrics.items() if k != "generation"}))
        self.logged.add(metrics["cycle"])
        self.cycles.add(self.run_dir, metrics["cycle"])

    def abort(self) -> None:
        """End the run as failed: the trial raised, and its retry starts the run again."""
        self.run.finish(exit_code=1)

    def finish(self, summary: dict) -> None:
        """`summary`: the trial's `trial_summary`, also kept as the trial's summary.json."""
        self.run.summary.update(summary)
        self.run.finish()
