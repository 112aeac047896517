"""Weights & Biases: one run per trial (a sweep's trials grouped by sweep), with the cycle as x-axis.

The history holds numbers only: each cycle's metrics against `cycle`, and each optimizer step's loss
(`train/loss`) against `train/step`, counted across the trial's cycles; a cycle's strings go to the
summary. Each cycle also logs a table of its evaluation answers, and its generation's weights (type
"model", aliased `cycle-<j>`) and, at the seed stage, D_seed (type "dataset") as artifacts: references to
their path in the storage, or uploads with `upload_artifacts`.

The run id is derived from the dir W&B writes in (the sweep's dir, or an `idempo run` trial's) and the
trial, so a trial retried, resumed or run again continues its run and logs each cycle once;
`<dir>/wandb/idempo-<id>.json` records which cycles each run dir holds. Offline, unsynced run dirs are
replaced by one that re-logs every completed cycle from the trial's artifacts (docs/cluster.md, "W&B").
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from idempo.artifacts import read_json, read_jsonl, write_json
from idempo.config import ExperimentConfig
from idempo.layout import SEED_CYCLE, TrialLayout

STEP, LOSS, ANSWERS = "train/step", "train/loss", "eval/answers"
MAX_TAG = 64  # W&B rejects longer tags
_FILES = (".yaml", ".yml", ".json", ".jsonl")


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


def history_values(flat: dict) -> tuple[dict, dict]:
    """The numbers of `flatten`'s output for the history (a boolean as 0/1), and its strings for the
    summary; a missing value (None) is left out."""
    numbers = {k: int(v) if isinstance(v, bool) else v for k, v in flat.items() if isinstance(v, int | float)}
    return numbers, {k: v for k, v in flat.items() if isinstance(v, str)}


def run_tags(values: dict[str, Any]) -> list[str]:
    """'key=value' for each field (the last part of a dotted name), at most MAX_TAG characters: a longer
    one is cut and ends in a hash of the whole. A file path shows as its name, never where it lies."""
    tags = []
    for key, value in values.items():
        if isinstance(value, str) and (value.startswith(("/", "~", ".")) or value.endswith(_FILES)):
            value = Path(value).stem if value.endswith(_FILES) else Path(value).name
        tag = f"{key.split('.')[-1]}={value}"
        if len(tag) > MAX_TAG:
            tag = f"{tag[: MAX_TAG - 9]}-{hashlib.sha256(tag.encode()).hexdigest()[:8]}"
        tags.append(tag)
    return list(dict.fromkeys(tags))


def logged_in() -> bool:
    """Whether W&B finds credentials as `wandb.init` does: WANDB_API_KEY, an identity token file, or the
    netrc entry `wandb login` writes for the configured host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib.wbauth import read_netrc_auth

    return read_netrc_auth(host=wandb_setup.singleton().settings.base_url) is not None


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if logged_in() else "offline"


def run_id(directory: str | Path, trial: str) -> str:
    """The run id of the trial whose W&B runs are written under `directory`: from its absolute path, so
    that a sweep of the same name in another storage path has runs of its own. A sweep whose runs began
    under the earlier id of (sweep name, trial) keeps it."""
    directory = Path(directory).resolve()
    earlier = hashlib.sha256(f"{directory.name}/{trial}".encode()).hexdigest()[:16]
    if (directory / "wandb" / f"idempo-{earlier}.json").exists():
        return earlier
    return hashlib.sha256(f"{directory}/{trial}".encode()).hexdigest()[:16]


def answers_table(rows: list[dict], cycle: int):
    """A cycle's judged evaluation answers (eval.jsonl without the branching factor's extra answers) with
    their scores; a coherence column when a coherence judge scored them."""
    import wandb

    rows = [row for row in rows if not row.get("bf_only")]
    columns = ["cycle", "question", "answer", "trait"] + (["coherence"] if any("coherence" in r for r in rows) else [])
    data = [[cycle, r["prompt"], r["response"], *(r.get(c) for c in columns[3:])] for r in rows]
    return wandb.Table(columns=columns, data=data)


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
    """A trial's W&B run: `log` each stage's metrics as the trial yields them, from M_init's on (a cycle
    the run already holds is skipped), `finish` with the trial's summary.

    A sweep's trial logs under the sweep's dir (`directory`), in the sweep's `group`, job type "trial",
    tagged with persona, regime and its `axes`; an `idempo run` trial logs in its own dir, job type "run",
    tagged with persona and regime."""

    def __init__(
        self,
        settings,
        config: ExperimentConfig,
        trial_dir: Path,
        directory: Path | None = None,
        group: str | None = None,
        axes: dict[str, Any] | None = None,
    ):
        import wandb

        directory = Path(directory or trial_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.layout, self.finetune = TrialLayout(trial_dir), config.training.finetune
        self.upload = settings.upload_artifacts
        mode = wandb_mode(settings.mode)
        identity = run_id(directory, self.layout.root.name)
        self.cycles = LoggedCycles(directory / "wandb", identity)
        if mode == "offline":
            self.cycles.drop_unsynced_offline_dirs()
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=group,
            job_type="trial" if group else "run",
            name=self.layout.root.name,
            id=identity,
            resume="allow",
            tags=run_tags({"persona": config.persona, "regime": config.regime, **(axes or {})}),
            config=config.to_dict(),  # endpoint keys live in the environment, never in the config
            dir=str(directory),
            mode=mode,
        )
        self.run.define_metric("cycle")
        self.run.define_metric("*", step_metric="cycle")
        self.run.define_metric(STEP)  # the loss has its own x-axis: a name defined exactly overrides "*"
        self.run.define_metric(LOSS, step_metric=STEP)
        self.run_dir = Path(self.run.dir).parent.name if mode == "offline" else "online"
        self.logged = self.cycles.logged()
        self.steps = 0  # optimizer steps of the cycles before the one being logged

    def log(self, metrics: dict) -> None:
        cycle, train = metrics["cycle"], metrics.get("train") or {}
        losses, first = train.get("losses") or [], self.steps
        self.steps += train.get("steps", len(losses))
        if cycle in self.logged:
            return
        numbers, strings = history_values(flatten({k: v for k, v in metrics.items() if k != "generation"}))
        if self.layout.eval(cycle).exists():
            numbers[ANSWERS] = answers_table(read_jsonl(self.layout.eval(cycle)), cycle)
        self.run.log(numbers)
        self.run.summary.update(strings)
        for step, loss in enumerate(losses, first + 1):
            self.run.log({STEP: step, LOSS: loss})
        weights = self.layout.weights(cycle, self.finetune)
        if weights.exists():
            self._artifact(f"{weights.name}-{self.run.id}", "model", weights, cycle)
        if cycle == SEED_CYCLE and self.layout.data(cycle).exists():
            self._artifact(f"d_seed-{self.run.id}", "dataset", self.layout.data(cycle), cycle)
        self.logged.add(cycle)
        self.cycles.add(self.run_dir, cycle)

    def _artifact(self, name: str, kind: str, path: Path, cycle: int) -> None:
        import wandb

        artifact = wandb.Artifact(name, type=kind, metadata={"cycle": cycle, "path": str(path.resolve())})
        if not self.upload:
            artifact.add_reference(path.resolve().as_uri())
        elif path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact, aliases=[f"cycle-{cycle}"])

    def abort(self) -> None:
        """End the run as failed: the trial raised, and its retry starts the run again."""
        self.run.finish(exit_code=1)

    def finish(self, summary: dict) -> None:
        """`summary`: the trial's `trial_summary`, also kept as a sweep trial's summary.json."""
        self.run.summary.update(summary)
        self.run.finish()
