"""W&B runs in offline mode, without Ray: one run dir per trial however often it starts, each cycle once."""

import os
import time
from pathlib import Path

from conftest import tiny_config
from sweep_helpers import wandb_records, wandb_run

from idempo.sweep import WandbSettings
from idempo.tracking import Tracker, run_id

SETTINGS = WandbSettings(mode="offline")


def metrics(cycle: int) -> dict:
    return {"cycle": cycle, "generation": f"M_{cycle}", "trait": {"mean": 10.0 + cycle, "ci95": [1.0, 20.0]}}


def start(directory: Path) -> Tracker:
    """A trial's tracker starting; a second apart, as restarts are (W&B names run dirs by the second)."""
    os.environ["WANDB_SILENT"] = "true"
    time.sleep(1.1)
    return Tracker(SETTINGS, "sweep", "trial", tiny_config(), directory)


def flushed(directory: Path, identity: str) -> Path:
    """`directory`, once every offline run file of `identity` ends with its exit record: W&B's core process
    may still be writing when `finish` returns."""
    deadline = time.monotonic() + 60
    for run_file in directory.glob(f"wandb/offline-run-*-{identity}*/run-{identity}.wandb"):
        while time.monotonic() < deadline:  # a file W&B has only just opened holds no record yet
            records = wandb_records(run_file)
            if records and records[-1].WhichOneof("record_type") == "exit":
                break
            time.sleep(0.5)
    return directory


def test_a_restarted_trial_has_one_offline_run_with_each_cycle_once(tmp_path):
    first = start(tmp_path)
    for cycle in (-1, 0, 1):
        first.log(metrics(cycle))
    first.abort()  # the trial crashed after cycle 1

    again = start(tmp_path)  # retried: its loop steps every cycle again, then goes on
    for cycle in (-1, 0, 1, 2):
        again.log(metrics(cycle))
    again.finish({"cycles_done": 2})

    identity = run_id("sweep", "trial")
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{identity}*"))) == 1
    run = wandb_run(flushed(tmp_path, identity), identity)
    assert [row["cycle"] for row in run["history"]] == [-1, 0, 1, 2]
    assert run["summary"]["cycles_done"] == 2


def test_an_offline_run_already_synced_is_kept_and_not_logged_again(tmp_path):
    first = start(tmp_path)
    for cycle in (-1, 0):
        first.log(metrics(cycle))
    first.run.finish()
    identity = run_id("sweep", "trial")
    (synced,) = (tmp_path / "wandb").glob(f"offline-run-*-{identity}*")
    (synced / f"run-{identity}.wandb.synced").write_text("")  # what `wandb sync` leaves

    again = start(tmp_path)
    for cycle in (-1, 0, 1):
        again.log(metrics(cycle))
    again.finish({"cycles_done": 1})
    dirs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{identity}*"))
    assert len(dirs) == 2 and synced in dirs
    # both dirs, in order: what `wandb sync` uploads into the one run
    run = wandb_run(flushed(tmp_path, identity), identity)
    assert [row["cycle"] for row in run["history"]] == [-1, 0, 1]
