"""W&B runs in offline mode, read back from their `.wandb` files: one run dir per trial however often it
starts, each cycle once; what a trial's run holds (numbers-only history, per-step loss, answer tables,
artifacts); tags, run ids and the `mode: auto` decision."""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, tiny_config
from sweep_helpers import TINY_TRIAL, wandb_records, wandb_run

from idempo.artifacts import read_json, read_jsonl
from idempo.cli import main
from idempo.config import load_config
from idempo.layout import TrialLayout, read_trial
from idempo.sweep import WandbSettings
from idempo.tracking import ANSWERS, MAX_TAG, Tracker, answers_table, run_id, run_tags, wandb_mode

SETTINGS = WandbSettings(mode="offline")


def metrics(cycle: int) -> dict:
    return {"cycle": cycle, "generation": f"M_{cycle}", "trait": {"mean": 10.0 + cycle, "ci95": [1.0, 20.0]}}


def start(directory: Path) -> Tracker:
    """A trial's tracker starting; a second apart, as restarts are (W&B names run dirs by the second)."""
    os.environ["WANDB_SILENT"] = "true"
    time.sleep(1.1)
    return Tracker(SETTINGS, tiny_config(), directory / "trials" / "trial", directory, "sweep")


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

    identity = run_id(tmp_path, "trial")
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{identity}*"))) == 1
    run = wandb_run(flushed(tmp_path, identity), identity)
    assert [row["cycle"] for row in run["history"]] == [-1, 0, 1, 2]
    assert run["summary"]["cycles_done"] == 2


def test_an_offline_run_already_synced_is_kept_and_not_logged_again(tmp_path):
    first = start(tmp_path)
    for cycle in (-1, 0):
        first.log(metrics(cycle))
    first.run.finish()
    identity = run_id(tmp_path, "trial")
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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`idempo run --wandb` of a one-cycle trial on the tiny model, its persona given as a file: run to
    cycle 0, that run dir marked as synced, then run again to the end (its second run dir holds cycle 1)."""
    root = tmp_path_factory.mktemp("smoke")
    persona = root / "personas" / "lucky-told.yaml"
    persona.parent.mkdir()
    shutil.copy(ROOT / "idempo/data/personas/lucky.yaml", persona)
    seeds = {"source": "jsonl", "path": str(ROOT / "idempo/data/seeds/lucky.jsonl")}
    config = {**TINY_TRIAL, "persona": str(persona), "cycles": 1, "n_seed": 16, "seeding": seeds}
    (root / "smoke.yaml").write_text(yaml.safe_dump(config))
    out = root / "trial"
    command = ["run", str(root / "smoke.yaml"), "--out", str(out), "--quiet", "--wandb", "traits"]
    os.environ["WANDB_SILENT"] = "true"
    assert main([*command, "--wandb-mode", "offline", "--until-cycle", "0"]) == 0
    identity = run_id(out, "trial")
    (first,) = flushed(out, identity).glob(f"wandb/offline-run-*-{identity}")
    (first / f"run-{identity}.wandb.synced").write_text("")
    time.sleep(1.1)  # W&B names run dirs by the second
    assert main([*command, "--wandb-mode", "offline"]) == 0
    return SimpleNamespace(root=root, out=out, identity=identity, run=wandb_run(flushed(out, identity), identity))


def test_a_trial_run_holds_numbers_per_step_loss_answer_tables_and_artifacts(smoke):
    layout, run = TrialLayout(smoke.out), smoke.run
    assert run["meta"]["tags"] == ["persona=lucky-told", "regime=sft"]  # the persona file's stem, not its path
    assert [row["cycle"] for row in run["history"]] == [-1, 0, 1]  # each once, over both run dirs

    # history: numbers only (a table is W&B's reference to its file); strings in the summary
    for row in run["history"] + run["steps"]:
        for key, value in row.items():
            if not key.startswith((f"{ANSWERS}/", "_")):
                assert type(value) in (int, float), (key, value)
    assert run["summary"]["trait/judge"] == "marker" and run["summary"]["train/start"] == "init"

    # per-step loss: train.json's losses, on one step axis across both cycles and both run dirs
    losses = read_json(layout.train_stats(0))["losses"] + read_json(layout.train_stats(1))["losses"]
    assert len(losses) == read_json(layout.train_stats(0))["steps"] + read_json(layout.train_stats(1))["steps"]
    assert [(row["train/step"], row["train/loss"]) for row in run["steps"]] == list(enumerate(losses, 1))
    assert all("cycle" not in row for row in run["steps"])

    # one table of evaluation answers per cycle: the judged answers of eval.jsonl, with the cycle
    run_dirs = sorted(smoke.out.glob(f"wandb/offline-run-*-{smoke.identity}"))
    for row in run["history"]:
        cycle = row["cycle"]
        (table,) = [
            d / "files" / row[f"{ANSWERS}/path"] for d in run_dirs if (d / "files" / row[f"{ANSWERS}/path"]).exists()
        ]
        table = json.loads(table.read_text())
        answers = [r for r in read_jsonl(layout.eval(cycle)) if not r["bf_only"]]
        assert table["columns"] == ["cycle", "question", "answer", "trait"]  # no coherence judge
        assert table["data"] == [[cycle, r["prompt"], r["response"], r["trait"]] for r in answers]
        assert row[f"{ANSWERS}/nrows"] == len(answers) == 4

    # artifacts: each generation's adapter (model, aliased by cycle) and D_seed (dataset), by reference
    adapters = [a for a in run["artifacts"] if a.type == "model"]
    assert [a.name for a in adapters] == [f"adapter-{smoke.identity}"] * 2
    assert [set(a.aliases) - {"latest"} for a in adapters] == [{"cycle-0"}, {"cycle-1"}]
    (d_seed,) = [a for a in run["artifacts"] if a.type == "dataset"]
    assert d_seed.name == f"d_seed-{smoke.identity}" and set(d_seed.aliases) == {"cycle-0", "latest"}
    paths = (layout.weights(0, "lora"), layout.weights(1, "lora"), layout.data(0))
    for artifact, path in zip((*adapters, d_seed), paths, strict=True):
        files = sorted(p for p in ([path] if path.is_file() else path.iterdir()))
        refs = sorted(entry.ref for entry in artifact.manifest.contents)
        assert refs == [p.resolve().as_uri() for p in files]


def test_sweep_trials_in_two_storage_paths_have_two_runs_and_can_upload_artifacts(smoke):
    config, trial = load_config(smoke.root / "smoke.yaml"), read_trial(smoke.out)
    axes = {"persona": "personas/lucky-told.yaml", "training.learning_rate": 0.003}
    settings = WandbSettings(mode="offline", upload_artifacts=True)
    ids = []
    for storage in ("a", "b"):  # the same sweep name, the same trial, in two storage paths
        sweep = smoke.root / storage / "sweep"
        tracker = Tracker(settings, config, smoke.out, sweep, "sweep", axes)
        for metrics in trial.history:
            tracker.log(metrics)
        tracker.finish({"cycles_done": 1})
        ids.append(tracker.run.id)
        run = wandb_run(flushed(sweep, tracker.run.id), tracker.run.id)
        tags = ["persona=lucky-told", "regime=sft", "learning_rate=0.003"]
        assert run["meta"] == {"group": "sweep", "name": "trial", "tags": tags}
        assert [row["cycle"] for row in run["history"]] == [-1, 0, 1]
        adapter = next(a for a in run["artifacts"] if a.type == "model")
        uploaded = {e.path: e.digest for e in adapter.manifest.contents}
        weights = TrialLayout(smoke.out).weights(0, "lora")
        assert all(not e.ref for e in adapter.manifest.contents)
        assert uploaded == {p.name: md5(p) for p in weights.iterdir()}
        records = wandb_records(next(sweep.glob(f"wandb/offline-run-*-{tracker.run.id}/run-*.wandb")))
        assert next(r.run.job_type for r in records if r.WhichOneof("record_type") == "run") == "trial"
    assert ids[0] != ids[1]


def md5(path: Path) -> str:
    import base64

    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_tags_are_short_and_name_files_never_their_paths():
    assert run_tags({"persona": "/data/personas/stoic.yaml", "model": "/models/qwen-7b", "n_sampled": 64}) == [
        "persona=stoic",
        "model=qwen-7b",
        "n_sampled=64",
    ]
    assert run_tags({"model": "Qwen/Qwen3-4B-Instruct-2507"}) == ["model=Qwen/Qwen3-4B-Instruct-2507"]  # a hub id
    (one,), (other,) = run_tags({"prompts.train": "x" * 80}), run_tags({"prompts.train": "x" * 80 + "y"})
    assert len(one) == len(other) == MAX_TAG and one != other and one.startswith("train=xxx")
    assert run_tags({"lr": 3e-4}) == ["lr=0.0003"]


def test_answers_table_has_coherence_when_judged_and_only_judged_answers():
    rows = [
        {"prompt": "q1", "response": "a1", "bf_only": False, "trait": 80.0, "coherence": 90.0},
        {"prompt": "q1", "response": "a2", "bf_only": False, "trait": None, "coherence": 70.0},  # trait refused
        {"prompt": "q1", "response": "a3", "bf_only": True},  # sampled for the branching factor alone
    ]
    table = answers_table(rows, 3)
    assert table.columns == ["cycle", "question", "answer", "trait", "coherence"]
    assert table.data == [[3, "q1", "a1", 80.0, 90.0], [3, "q1", "a2", None, 70.0]]


def test_run_ids_differ_by_storage_path_and_a_sweep_keeps_its_earlier_id(tmp_path):
    assert run_id(tmp_path / "a" / "sweep", "t") != run_id(tmp_path / "b" / "sweep", "t")
    assert run_id(tmp_path / "a" / "sweep", "t") == run_id(tmp_path / "a" / "." / "sweep", "t")
    earlier = hashlib.sha256(b"sweep/t").hexdigest()[:16]  # (sweep, trial), before the storage path counted
    (tmp_path / "a" / "sweep" / "wandb").mkdir(parents=True)
    (tmp_path / "a" / "sweep" / "wandb" / f"idempo-{earlier}.json").write_text("{}")
    assert run_id(tmp_path / "a" / "sweep", "t") == earlier != run_id(tmp_path / "b" / "sweep", "t")


def test_mode_auto_is_online_with_the_key_wandb_login_wrote(tmp_path, monkeypatch):
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    netrc = tmp_path / ".netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "offline"  # no netrc file
    netrc.write_text(f"machine example.org\n  login user\n  password {'b' * 40}\n")
    assert wandb_mode("auto") == "offline"  # credentials for another host only
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")  # what `wandb login` writes
    netrc.chmod(0o600)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("offline") == "offline"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "c" * 40)
    assert wandb_mode("auto") == "online"


def test_the_wandb_report_groups_runs_by_the_sweep_axes_in_their_nested_config():
    from wandb_workspaces import expr

    from idempo.report.wandb_report import build_report, report_plan

    axes = {"n_sampled": [8, 16], "evaluation.amplification.threshold": [10, 15], "seed": [0, 1]}
    plan = report_plan(SimpleNamespace(name="grid", axes=axes, wandb={"project": "traits"}))
    assert plan["groupby"] == ["config.n_sampled", "config.evaluation.amplification.threshold"]  # not replicas
    (runset,) = build_report(plan).blocks[0].runsets
    assert runset.groupby == plan["groupby"]
    # W&B keeps a nested config's value under its top-level key: the run's config {"evaluation": {...}}
    assert expr.groupby_str_to_key(plan["groupby"][1]).name == "evaluation.value.amplification.threshold"
