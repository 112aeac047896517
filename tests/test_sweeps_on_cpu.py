"""Sweeps on a real local Ray: grids, placement with (fake) GPUs, early stopping, retries, resume,
W&B offline runs, and `ray job submit` to a `ray start --head` cluster."""

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from openai_server import FakeOpenAI, lucky_judge
from sweep_helpers import (
    TINY_TRIAL,
    process_tree,
    ray_cluster_processes,
    start_local_ray,
    stop_processes,
    wandb_run,
    write_sweep,
)

from idempo.artifacts import read_json
from idempo.cli import main
from idempo.config import ConfigError
from idempo.layout import TrialLayout, stage_cycles
from idempo.sweep import load_sweep
from idempo.tracking import run_id
from idempo.tune import FAULT_AFTER_CYCLE, FAULT_ONCE_FILE, run_sweep


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module, with 2 fake GPUs (Ray only counts them)."""
    import ray

    os.environ["WANDB_SILENT"] = "true"
    start_local_ray()
    yield
    ray.shutdown()


def progress_cycles(sweep_root: Path, trial: str) -> list[int]:
    """The cycles Tune received for a trial, from its progress.csv, in order."""
    rows = []
    for progress in sweep_root.glob("tune/*/progress.csv"):
        with progress.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("trial_dir", "").endswith(f"/{trial}"):
                    rows.append(int(float(row["cycle"])))
    return rows


def test_a_four_trial_sweep_completes_with_every_cycle_and_wandb_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, "grid", axes={"init": ["initial", "previous"], "n_sampled": [4, 8]})
    sweep = load_sweep(path)
    assert [t.name for t in sweep.trials] == [
        "init-initial_n_sampled-4",
        "init-initial_n_sampled-8",
        "init-previous_n_sampled-4",
        "init-previous_n_sampled-8",
    ]
    rows = run_sweep(sweep)
    assert all(row["cycles_done"] == 2 and row["error"] is None for row in rows)
    root = sweep.storage / "grid"
    for trial in sweep.trials:
        layout = TrialLayout(sweep.trial_dir(trial.name))
        assert all(layout.is_complete(c) for c in (-1, 0, 1, 2))
        assert read_json(layout.metrics(1))["data"]["n"] == trial.config.n_sampled
        assert sorted(progress_cycles(root, trial.name)) == [-1, 0, 1, 2]
        run = wandb_run(root, run_id(root, trial.name))
        tags = ["persona=lucky", "regime=sft", *(f"{axis}={value}" for axis, value in trial.axes.items())]
        assert run["meta"] == {"group": "grid", "name": trial.name, "tags": tags}
        assert [row["cycle"] for row in run["history"]] == [-1, 0, 1, 2]
        assert all("trait/mean" in row for row in run["history"])
        summary = run["summary"]
        for key in (
            "peak_trait",
            "final_trait",
            "amplified",
            "min_coherence",
            "stop_reason",
            "amplification/max_delta",
        ):
            assert key in summary
        assert summary["final_trait"] == read_json(layout.metrics(2))["trait"]["mean"]
        placement = read_json(sweep.trial_dir(trial.name) / "placement.json")
        assert placement["threads"] == 1, "torch computes with the trial's one CPU"
    # Tune's own views hold the axis values beside the trial's name (its param_space)
    from ray.tune import ExperimentAnalysis, ResultGrid

    configs = {result.config["trial"]: result.config for result in ResultGrid(ExperimentAnalysis(str(root / "tune")))}
    assert configs == {t.name: {"trial": t.name, **t.axes} for t in sweep.trials}
    assert configs["init-previous_n_sampled-8"] | {"trial": None} == {"trial": None, "init": "previous", "n_sampled": 8}


def test_trials_receive_the_gpus_and_bundles_they_ask_for(tmp_path):
    path = write_sweep(
        tmp_path, "gpus", axes={"seed": [0, 1]}, config={"cycles": 0}, run={"resources": {"cpus": 1, "gpus": 1}}
    )
    sweep = load_sweep(path)
    rows = run_sweep(sweep)
    assert all(row["error"] is None for row in rows)
    placements = [read_json(sweep.trial_dir(t.name) / "placement.json") for t in sweep.trials]
    for placement in placements:
        assert placement["bundles"] == [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
        assert len(placement["gpu_ids"]) == 1  # the engine actor holds one GPU of its bundle


def test_trials_asking_for_half_a_gpu_share_one_and_one_trains_while_the_other_evaluates(tmp_path):
    """Two trials at gpus 0.5 on a Ray with one (fake) GPU: `max_concurrent_trials: auto` runs both at once,
    on GPU 0, and their timelines hold an interval in which one trains while the other evaluates. Their
    judges, on loopback, make the overlap certain on any machine: the `evaluator` trial's judge holds its
    first answers until the `trainer` trial has begun a training after the evaluation they belong to
    began, and the `trainer`'s judge holds its answers after M_init's until the `evaluator` is evaluating,
    so that neither can run through its trial before the other has started."""
    import threading

    import ray

    from idempo.placement import TrialPlacement
    from idempo.status import gpu_busy_shares
    from idempo.timeline import overlaps, read_phases
    from idempo.tune import max_concurrent

    assert max_concurrent(TrialPlacement.for_trial(1, 0.5).bundles, "auto", {"CPU": 8, "GPU": 1}) == 2
    assert max_concurrent(TrialPlacement.for_trial(1, 1 / 3).bundles, "auto", {"CPU": 8, "GPU": 2}) == 6
    released = threading.Event()
    layouts: dict[str, TrialLayout] = {}

    def running(name: str, phase: str) -> list[dict]:
        return [p for p in read_phases(layouts[name].timeline) if p["phase"] == phase and p["end"] is None]

    def ready(model: str) -> bool:
        if model == "evaluator":  # a training of the other trial that began during this evaluation
            evaluating = running("model-evaluator", "eval")
            trainings = read_phases(layouts["model-trainer"].timeline)
            return bool(evaluating) and any(
                p["phase"] == "train" and p["start"] > evaluating[-1]["start"] for p in trainings
            )
        after_m_init = [p for p in running("model-trainer", "eval") if p["cycle"] >= 0]
        return not after_m_init or bool(running("model-evaluator", "eval"))

    def judge_holding_until_the_trials_overlap(request):
        deadline = time.monotonic() + 600  # a safety net: a trial that never came fails the test below
        while not released.is_set() and not ready(request["model"]) and time.monotonic() < deadline:
            released.wait(timeout=0.05)
        if request["model"] == "evaluator":
            released.set()
        return lucky_judge(request)

    ray.shutdown()
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with FakeOpenAI(answer=judge_holding_until_the_trials_overlap) as server:
            judge = {"backend": "openai", "base_url": server.base_url, "timeout_s": 900, "cache": False}
            path = write_sweep(
                tmp_path,
                "shared-gpu",
                axes={"evaluation.judge.model": ["trainer", "evaluator"]},
                config={"evaluation": {**TINY_TRIAL["evaluation"], "judge": judge}},
                run={"resources": {"cpus": 1, "gpus": 0.5}, "wandb": {"mode": "disabled"}},
            )
            sweep = load_sweep(path)
            layouts.update({t.name: TrialLayout(sweep.trial_dir(t.name)) for t in sweep.trials})
            rows = run_sweep(sweep)
        assert all(row["error"] is None and row["cycles_done"] == 2 for row in rows), rows
    finally:
        released.set()
        ray.shutdown()
        start_local_ray()
    placements = [read_json(layout.placement) for layout in layouts.values()]
    assert [p["bundles"] for p in placements] == [[{"CPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}]] * 2
    assert [p["gpu_ids"] for p in placements] == [["0"], ["0"]]
    trainer, evaluator = (read_phases(layouts[name].timeline) for name in ("model-trainer", "model-evaluator"))
    assert all(p["end"] is not None for p in trainer + evaluator)
    assert overlaps(trainer, evaluator, ({"train"}, {"eval", "sample"})), (trainer, evaluator)
    (share,) = gpu_busy_shares(sweep.directory).values()
    assert 0 < share <= 1


@pytest.mark.parametrize("retrain", [False, True])
def test_replicas_train_m_seed_once_unless_told_to_retrain_it(tmp_path, retrain):
    """Two replicas with the same seed stage: one M_seed, trained once, held by both trials as the same
    bytes; with retrain_seed_model each replica trains its own."""
    path = write_sweep(tmp_path, "replicas", config={"cycles": 1})
    text = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**text, "replicas": 2, "retrain_seed_model": retrain}))
    sweep = load_sweep(path)
    assert sweep.record()["shared_stages"].keys() == ({"init"} if retrain else {"init", "seed"})
    rows = run_sweep(sweep)
    assert all(row["error"] is None and row["cycles_done"] == 1 for row in rows)
    layouts = [TrialLayout(sweep.trial_dir(t.name)) for t in sweep.trials]
    seeds = [read_json(layout.metrics(0)) for layout in layouts]
    adapters = [(layout.weights(0, "lora") / "adapter_model.safetensors").read_bytes() for layout in layouts]
    trained_here = [not (m.get("shared") or {}).get("reused", False) for m in seeds]
    if retrain:
        assert trained_here == [True, True] and "shared" not in seeds[0] and adapters[0] != adapters[1]
    else:
        assert sorted(trained_here) == [False, True] and adapters[0] == adapters[1]
        origin = next(m["shared"]["origin"] for m in seeds if m["shared"]["reused"])
        assert origin in [t.name for t in sweep.trials] and origin == next(
            t.name for t, here in zip(sweep.trials, trained_here, strict=True) if here
        )
    # M_init's evaluation is shared when its seed (seeding.seed) is; retrained replicas each have their own
    initial = [read_json(layout.metrics(-1))["shared"]["reused"] for layout in layouts]
    assert sorted(initial) == ([False, False] if retrain else [False, True])
    assert read_json(sweep.directory / "sweep.json")["retrain_seed_model"] is retrain
    # the report says where each trial's M_seed comes from
    from idempo.report import write_report
    from idempo.report.tables import trial_rows

    _, results = write_report(sweep.directory)
    stages = sorted(row["m_seed"] for row in trial_rows(results))
    if retrain:
        assert stages == ["trained here", "trained here"]
    else:
        assert stages == [f"shared, from {origin}", "trained here, shared"]


def test_an_impossible_request_fails_fast_with_a_clear_message(tmp_path):
    path = write_sweep(tmp_path, "too-big", run={"resources": {"cpus": 1, "gpus": 4}})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"run.resources: .*4 GPU.* the largest node has .*2 GPU"):
        run_sweep(load_sweep(path))
    assert time.monotonic() - started < 30


def test_a_trial_whose_coherence_falls_under_the_floor_stops_at_the_right_cycle(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEMPO_CACHE", os.environ["IDEMPO_CACHE"])
    with FakeOpenAI() as server:  # coherence 78.9 for every answer
        judge = {"backend": "openai", "model": "judge", "base_url": server.base_url}
        evaluation = {**write_sweep.__globals__["TINY_TRIAL"]["evaluation"], "coherence_judge": judge}
        path = write_sweep(
            tmp_path,
            "stopping",
            axes={"evaluation.amplification.threshold": [15]},
            config={"cycles": 3, "evaluation": evaluation},
            run={"stop": {"metric": "coherence.mean", "floor": 80, "grace_cycles": 2}},
        )
        sweep = load_sweep(path)
        rows = run_sweep(sweep)
    trial = sweep.trials[0].name
    stopped = read_json(sweep.trial_dir(trial) / "stopped.json")
    assert stopped["cycle"] == 2 and "coherence.mean 78.9 < floor 80 at cycle 2" in stopped["reason"]
    assert rows[0]["cycles_done"] == 2 and rows[0]["stop_reason"] == stopped["reason"]
    assert not TrialLayout(sweep.trial_dir(trial)).is_complete(3)
    root = sweep.storage / "stopping"
    assert wandb_run(root, run_id(root, trial))["summary"]["stop_reason"] == stopped["reason"]


def restart_ray():
    import ray

    ray.shutdown()
    start_local_ray()


def test_a_trial_that_crashes_once_is_retried_from_its_last_cycle(tmp_path, monkeypatch):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(FAULT_AFTER_CYCLE, "1")
    monkeypatch.setenv(FAULT_ONCE_FILE, str(marker))
    restart_ray()  # workers take the environment of the Ray instance they belong to
    path = write_sweep(tmp_path, "retry", run={"max_failures": 1})
    sweep = load_sweep(path)
    try:
        rows = run_sweep(sweep)
    finally:
        monkeypatch.delenv(FAULT_AFTER_CYCLE)
        restart_ray()
    assert marker.exists() and rows[0]["error"] is None and rows[0]["cycles_done"] == 2
    layout = TrialLayout(sweep.trial_dir("base"))
    crashed_at = marker.stat().st_mtime
    for cycle in (-1, 0, 1):  # written before the crash, not redone after it
        assert layout.metrics(cycle).stat().st_mtime < crashed_at
    assert layout.metrics(2).stat().st_mtime > crashed_at
    assert sorted(progress_cycles(sweep.storage / "retry", "base")) == [-1, 0, 1, 2]  # each reported once
    identity = run_id(sweep.storage / "retry", "base")  # the retry continued the trial's one W&B run, each cycle once
    assert len(list((sweep.storage / "retry" / "wandb").glob(f"offline-run-*-{identity}*"))) == 1
    assert [row["cycle"] for row in wandb_run(sweep.storage / "retry", identity)["history"]] == [-1, 0, 1, 2]


def test_a_killed_sweep_resumes_without_redoing_cycles(tmp_path):
    import ray

    ray.shutdown()  # the sweep runs in its own process with its own Ray
    try:
        path = write_sweep(
            tmp_path, "resume", axes={"seed": [0, 1]}, config={"cycles": 3}, run={"max_concurrent_trials": 1}
        )
        sweep = load_sweep(path)
        env = {**os.environ, "WANDB_SILENT": "true"}
        driver = subprocess.Popen(
            [sys.executable, "-m", "idempo", "sweep", str(path)],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first = TrialLayout(sweep.trial_dir("seed-0"))
        deadline = time.monotonic() + 300
        while not first.is_complete(1) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert first.is_complete(1), "the first trial never finished cycle 1"
        time.sleep(3)  # let Tune save its experiment state once more
        started = process_tree(driver.pid)  # the driver and the local Ray it brought up, and nothing else
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        stop_processes(started)
        done = {p: p.stat().st_mtime_ns for p in (sweep.storage / "resume" / "trials").rglob("metrics.json")}
        assert done and not all(TrialLayout(sweep.trial_dir(t.name)).is_complete(3) for t in sweep.trials)

        resumed = subprocess.run(
            [sys.executable, "-m", "idempo", "sweep", str(path), "--resume"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        for trial in sweep.trials:
            assert TrialLayout(sweep.trial_dir(trial.name)).is_complete(3), trial.name
        for metrics, mtime in done.items():
            assert metrics.stat().st_mtime_ns == mtime, f"{metrics} was rewritten"
        # the resumed trials continued their W&B runs: the same run id before and after the restore, every
        # cycle logged, and the summary written at the end
        interrupted = sweep.storage / "resume" / "wandb"
        for trial in sweep.trials:
            identity = run_id(sweep.storage / "resume", trial.name)
            run = wandb_run(sweep.storage / "resume", identity)
            assert [row["cycle"] for row in run["history"]] == [-1, 0, 1, 2, 3], trial.name
            assert run["summary"]["cycles_done"] == 3 and run["meta"]["name"] == trial.name
        for trial in sweep.trials:  # one offline run dir each, however often the trial started
            identity = run_id(sweep.storage / "resume", trial.name)
            assert len(list(interrupted.glob(f"offline-run-*-{identity}*"))) == 1, trial.name
    finally:
        start_local_ray()


def next_stage(layout: TrialLayout, cycles: int) -> int | None:
    return next((c for c in stage_cycles(cycles) if not layout.is_complete(c)), None)


def test_status_follows_a_sweep_running_in_the_background(tmp_path, capsys):
    """`idempo status` on a sweep still running in another process shows its first trial at the stage it is
    in (and the second pending: one trial at a time), then both done; the driver's stdout, what `ray job
    logs` shows, carries every cycle line of both trials as `idempo run` prints them. The trial's judge, on
    loopback, holds the first answer it is asked to score in cycle 1 until status has been read, so the
    trial is caught mid-stage however fast this machine runs it."""
    import threading

    import ray

    from idempo.progress import HEADER, summary_line

    ray.shutdown()  # the sweep runs in its own process with its own Ray
    driver = None
    held, release = threading.Event(), threading.Event()
    first = None

    def judge_holding_cycle_one(request):
        if first is not None and not held.is_set() and next_stage(first, 2) == 1:
            held.set()
            release.wait(timeout=600)
        return lucky_judge(request)

    try:
        with FakeOpenAI(answer=judge_holding_cycle_one) as server:
            judge = {"backend": "openai", "model": "judge-model", "base_url": server.base_url, "backoff_s": 0.01}
            evaluation = {**TINY_TRIAL["evaluation"], "judge": judge}
            run = {"max_concurrent_trials": 1, "wandb": {"mode": "disabled"}}
            config = {"cycles": 2, "evaluation": evaluation}
            path = write_sweep(tmp_path, "watched", axes={"seed": [0, 1]}, config=config, run=run)
            sweep = load_sweep(path)
            first = TrialLayout(sweep.trial_dir("seed-0"))
            log = tmp_path / "driver.log"
            with log.open("w") as output:
                driver = subprocess.Popen(
                    [sys.executable, "-m", "idempo", "sweep", str(path)],
                    env={**os.environ, "RAY_ADDRESS": "local"},  # a Ray of its own, never one running here
                    start_new_session=True,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + 600
            while not held.wait(timeout=0.5) and driver.poll() is None and time.monotonic() < deadline:
                pass
            assert held.is_set(), log.read_text()[-3000:]
            assert main(["status", str(sweep.directory)]) == 0
            lines = capsys.readouterr().out.splitlines()
            release.set()
            row = next(line.split() for line in lines if line.split()[1:2] == ["seed-0"])
            assert row[2:4] == ["running", "1/2"] and row[5] == "evaluating", lines
            assert next(line for line in lines if " seed-1 " in line).split()[2] == "pending", lines
            assert driver.wait(timeout=900) == 0, log.read_text()[-3000:]
        assert main(["status", str(sweep.directory)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "2 trials: 2 done"
        printed = log.read_text()
        assert f"  # {HEADER}" in printed
        for number, trial in enumerate(sweep.trials, 1):
            for cycle in stage_cycles(2):
                metrics = read_json(TrialLayout(sweep.trial_dir(trial.name)).metrics(cycle))
                shared = "shared" if (metrics.get("shared") or {}).get("reused") else None
                assert f"{number:>3} {summary_line(metrics, shared)}" in printed, (trial.name, cycle)
    finally:
        release.set()
        if driver is not None and driver.poll() is None:
            stop_processes(process_tree(driver.pid))  # the driver and the Ray it started, nothing else
        start_local_ray()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_sweep_on_a_started_cluster(tmp_path):
    import ray

    ray.shutdown()
    ray_bin = Path(sys.executable).parent / "ray"
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    temp = Path("/tmp") / f"idempo-ray-{port}"  # Ray's socket paths must stay short
    env = {**os.environ, "WANDB_SILENT": "true", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    try:
        subprocess.run(
            [
                str(ray_bin),
                "start",
                "--head",
                f"--port={port}",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={agent}",  # not the default, which a running Ray may hold
                "--num-cpus=2",
                "--include-dashboard=true",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
            ],
            check=True,
            capture_output=True,
            env=env,
            timeout=180,
        )
        # the README's smoke sweep, submitted from the repository as a user submits it (Ray honours .gitignore)
        for _ in range(18):  # the head's job agent comes up a while after `ray start` returns
            submitted = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir"]
                + [str(ROOT), "--", sys.executable, "-m", "idempo", "sweep", "sweeps/smoke-sweep.yaml"],
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
            )
            if "No available agent to submit job" not in submitted.stdout + submitted.stderr:
                break
            time.sleep(10)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
        assert "succeeded" in submitted.stdout
        from idempo.progress import HEADER

        assert f"  # {HEADER}" in submitted.stdout  # each trial's cycle lines reach the job's logs
        for number in (1, 2, 3, 4):
            for generation in ("init", "000-seed", "001", "002"):
                assert re.search(rf"^ +{number} {generation} ", submitted.stdout, re.MULTILINE), (number, generation)
        for init in ("initial", "previous"):
            for n_sampled in (32, 64):  # the closing table: both cycles done, no error
                row = rf"^init-{init}_n_sampled-{n_sampled}\s+2\s+\S+\s+\S+\s+.*-\s*$"
                assert re.search(row, submitted.stdout, re.MULTILINE), submitted.stdout[-3000:]
    finally:
        stop_processes(ray_cluster_processes(temp))  # the cluster this test started, not any other
        shutil.rmtree(temp, ignore_errors=True)
        start_local_ray()


def test_every_sweep_file_in_the_repository_validates(capsys, monkeypatch):
    from idempo.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "a key the checks only look for")  # the sweeps' judges and teachers

    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        if "name" not in path.read_text():
            continue  # a single-trial experiment config, not a sweep file
        assert main(["sweep", str(path), "--dry-run"]) == 0, path
    assert "trial" in capsys.readouterr().out


def test_cluster_yaml_is_a_valid_cluster_launcher_config():
    import json

    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    gpu_nodes = [n for n in cluster["available_node_types"].values() if n["resources"].get("GPU")]
    assert gpu_nodes and cluster["available_node_types"][cluster["head_node_type"]]["resources"].get("GPU") is None
    assert any("[gpu]" in command for command in cluster["setup_commands"])


def test_bad_trials_are_reported_together_before_anything_runs(tmp_path):
    path = write_sweep(tmp_path, "bad", axes={"n_seed": [0, 16], "init": ["initial", "sideways"]})
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    problems = error.value.problems
    assert "trial n_seed-0_init-initial: n_seed: got 0; must be greater than 0" in problems
    assert any(p.startswith("trial n_seed-16_init-sideways: init: got 'sideways'") for p in problems)
    assert len(problems) == 4  # n_seed 0 twice, 'sideways' twice
    path.write_text(path.read_text().replace("name: bad", "name: bad\nreplica: 3"))
    with pytest.raises(ConfigError, match="replica: unknown key; allowed keys here: .*'replicas'"):
        load_sweep(path)
    assert not (tmp_path / "storage").exists()
    text = path.read_text().replace("replica: 3", "").replace(f"storage_path: {tmp_path}", "storage_path: s3://bucket")
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"run.storage_path: got 's3://bucket/storage'; must be a filesystem path"):
        load_sweep(path)


def test_a_config_error_on_the_engines_node_is_not_retried_in_earnest(tmp_path):
    """DeepSpeed passes the driver's checks (the trial asks for a GPU) but the engines' bundle has no
    CUDA: the trial fails with the problem named, before any engine loads, and its retries fail at once
    from the kept error instead of trying again."""
    path = write_sweep(
        tmp_path,
        "no-cuda",
        config={"cycles": 1, "training": {"deepspeed": {"stage": 2}}},
        run={"resources": {"cpus": 1, "gpus": 1}, "max_failures": 2},
    )
    sweep = load_sweep(path)
    rows = run_sweep(sweep)
    assert "training.deepspeed" in (rows[0]["error"] or ""), rows
    assert not sweep.trial_dir("base").exists()  # no engine ever started: nothing was loaded or written
    (kept,) = (sweep.directory / "tune").rglob("config-error.json")
    assert any("training.deepspeed" in p for p in read_json(kept)["problems"])
