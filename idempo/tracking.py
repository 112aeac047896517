"""Weights & Biases: one run per trial, grouped by sweep, with the cycle as x-axis.

Offline (files under the sweep's dir, `wandb sync` uploads them later) unless WANDB_API_KEY is set or
the sweep says otherwise. The run id is derived from (sweep, trial), so a trial retried or resumed after
a restore continues the same run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


class Tracker:
    """A trial's W&B run; `log` each cycle's metrics, `finish` with the trial's summary."""

    def __init__(self, settings, sweep: str, trial: str, config: ExperimentConfig, directory: Path):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=sweep,
            name=trial,
            id=run_id(sweep, trial),
            resume="allow",
            tags=[config.persona, config.regime],
            config=config.to_dict(),  # endpoint keys live in the environment, never in the config
            dir=str(directory),
            mode=wandb_mode(settings.mode),
        )
        self.run.define_metric("cycle")
        self.run.define_metric("*", step_metric="cycle")

    def log(self, metrics: dict) -> None:
        self.run.log(flatten({k: v for k, v in metrics.items() if k != "generation"}))

    def finish(self, summary: dict) -> None:
        """`summary`: the trial's `trial_summary`, also kept as the trial's summary.json."""
        self.run.summary.update(summary)
        self.run.finish()
