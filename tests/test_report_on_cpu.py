"""`idempo report`: on a real sweep (read while it runs, then when done) and on hand-built artifacts."""

import csv
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweep_helpers import write_sweep

from idempo.artifacts import read_json, write_json
from idempo.cli import main
from idempo.layout import TrialLayout
from idempo.report import write_report
from idempo.sweep import load_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A 4-trial sweep (n_sampled x 2 replicas, one trial at a time) started in the background."""
    root = tmp_path_factory.mktemp("report-sweep")
    path = write_sweep(root, "rep", axes={"n_sampled": [8, 16]}, config={"cycles": 2}, run={"max_concurrent_trials": 1})
    text = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**text, "replicas": 2}, sort_keys=False))
    sweep = load_sweep(path)
    log = root / "sweep.log"
    with log.open("w") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "idempo", "sweep", str(path)],
            env={**os.environ, "WANDB_SILENT": "true"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    yield sweep, driver, log
    if driver.poll() is None:
        driver.kill()
        driver.wait()


@pytest.fixture(scope="module")
def finished_sweep(sweep_run):
    sweep, driver, log = sweep_run
    assert driver.wait(timeout=900) == 0, log.read_text()[-3000:]
    return sweep


def test_a_report_of_a_running_sweep_marks_its_partial_trials(sweep_run, tmp_path, capsys):
    sweep, driver, log = sweep_run
    layouts = [TrialLayout(sweep.trial_dir(t.name)) for t in sweep.trials]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        # a trial that has claimed its dir but not trained M_seed yet has seconds of work ahead
        running = [layout for layout in layouts if layout.config.exists() and not layout.is_complete(0)]
        if running:
            break
        time.sleep(0.2)
    assert running, "no trial was caught running: " + log.read_text()[-2000:]

    assert main(["report", str(sweep.directory), "--out", str(tmp_path / "mid")]) == 0
    assert driver.poll() is None, "the sweep finished before the report ran: nothing partial was read"
    shown = capsys.readouterr().out
    assert "4 trials" in shown and "partial" in shown
    rows = {row["trial"]: row for row in csv.DictReader((tmp_path / "mid" / "trials.csv").open())}
    assert list(rows) == [t.name for t in sweep.trials]  # planned trials listed before they start
    assert rows[running[0].root.name]["status"] == "partial"
    assert "not started" in {row["status"] for row in rows.values()}  # one trial at a time: others wait
    page = (tmp_path / "mid" / "index.html").read_text()
    assert "are partial (still running, or interrupted)" in page and running[0].root.name in page


def test_a_finished_sweep_gets_every_figure_and_table(finished_sweep, tmp_path):
    sweep = finished_sweep
    out, results = write_report(sweep.directory, tmp_path / "report")
    for name in ("index.html", "trials.csv", "trials.md", "replicas.csv", "cycles.csv", "figures.json"):
        assert (out / name).stat().st_size > 0, name
    for stem in ("trait-lucky-sft", "tradeoff"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 0 and (out / "figures" / f"{stem}.svg").exists()

    with (out / "cycles.csv").open() as handle:
        cycles = list(csv.DictReader(handle))
    keys = [(row["trial"], int(row["cycle"])) for row in cycles]
    assert sorted(keys) == sorted((t.name, c) for t in sweep.trials for c in (-1, 0, 1, 2))  # one row each
    by_key = dict(zip(keys, cycles, strict=True))
    for trial in sweep.trials:
        metrics = read_json(TrialLayout(sweep.trial_dir(trial.name)).metrics(1))
        assert float(by_key[(trial.name, 1)]["trait/mean"]) == pytest.approx(metrics["trait"]["mean"])
        assert by_key[(trial.name, 1)]["seed"] == str(trial.axes["seed"])

    trials = list(csv.DictReader((out / "trials.csv").open()))
    assert {row["status"] for row in trials} == {"complete"} and {row["cycles"] for row in trials} == {"2/2"}
    assert (out / "trials.md").read_text().count("\n") == len(trials) + 2
    groups = list(csv.DictReader((out / "replicas.csv").open()))
    assert [(g["n_sampled"], g["replicas"]) for g in groups] == [("8", "2"), ("16", "2")]

    # replicas share M_seed (seeding.seed is fixed): the seed cycle scores the same in every trial
    assert len({row["seed_trait"] for row in trials}) == 1

    figures = {f["name"]: f for f in read_json(out / "figures.json")}
    assert figures["trait-lucky-sft"]["panels"] == ["n_sampled = 8", "n_sampled = 16"]
    svg = (out / "figures" / "trait-lucky-sft.svg").read_text()
    assert len(re.findall(r'<g id="axes_\d+"', svg)) == 2  # one drawn panel per n_sampled
    assert "n_seed=32 (2 replicas)" in svg
    from PIL import Image

    with Image.open(out / "figures" / "trait-lucky-sft.png") as image:
        assert image.width > 2 * image.height * 0.8  # two panels side by side


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (CI installs it)")
def test_the_page_renders_in_headless_chromium(finished_sweep, tmp_path):
    from PIL import Image

    out, _ = write_report(finished_sweep.directory, tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,2200",
            f"--screenshot={shot}",
            (out / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20)
        assert len(colours) > 50, "the screenshot is blank"
        counts = {colour: n for n, colour in colours}
        # the figures' first line colour (#1f77b4) is on the page: the images loaded from disk
        assert counts.get((0x1F, 0x77, 0xB4), 0) > 100


def _hand_built_trial(root: Path, name: str, trait: list[float], half_width: float, cycles: int, **config):
    """A trial dir whose cycle j (0 = M_seed) scored trait[j] with a 95% interval of +-half_width."""
    layout = TrialLayout(root / "trials" / name)
    full = {"model": "tiny", "persona": "lucky", "regime": "sft", "cycles": cycles, "n_seed": 40, **config}
    layout.root.mkdir(parents=True)
    layout.config.write_text(yaml.safe_dump(full))
    for cycle, score in enumerate(trait):
        metrics = {
            "cycle": cycle,
            "trait": {"mean": score, "ci95": [score - half_width, score + half_width], "n": 36},
            "coherence": {"mean": 90.0 - 5 * cycle, "ci95": [80.0 - 5 * cycle, 95.0 - 5 * cycle], "n": 36},
            "branching_factor": {"mean": 10.0 / (cycle + 1), "ci95": [1.0, 20.0], "n": 36},
        }
        write_json(layout.metrics(cycle), metrics)


def test_amplification_flags_in_the_table_match_hand_built_cases(tmp_path, capsys):
    sweep = tmp_path / "hand"
    # M_seed scores 40; a rise of 20 at cycle 4 only; at 4 and 5 but with wide intervals; none; partial
    _hand_built_trial(sweep, "spike", [40, 41, 42, 43, 60, 44], 3, 5, n_sampled=100)
    _hand_built_trial(sweep, "noisy", [40, 41, 42, 43, 60, 61], 30, 5, n_sampled=100)
    _hand_built_trial(sweep, "flat", [40, 40, 41, 39, 40, 40], 3, 5, n_sampled=200)
    _hand_built_trial(sweep, "early", [40, 70, 75], 3, 5, n_sampled=200)
    write_json(sweep / "trials" / "early" / "stopped.json", {"cycle": 2, "reason": "coherence.mean 80 < 85"})
    _hand_built_trial(sweep, "running", [40, 45], 3, 5, n_sampled=200)

    def flags(*amplification: str) -> list[str]:
        """The verdicts of early, flat, noisy, running and spike ('' where undecided)."""
        args = ["report", str(sweep), "--out", str(tmp_path / "out")]
        assert main([*args, *(x for a in amplification for x in ("--amplification", a))]) == 0
        rows = csv.DictReader((tmp_path / "out" / "trials.csv").open())
        return [row["amplified"] for row in sorted(rows, key=lambda row: row["trial"])]

    # the default rule: +15 and significant; noisy's +20 over intervals of +-30 is not
    assert flags() == ["", "False", "False", "", "True"]
    rows = {row["trial"]: row for row in csv.DictReader((tmp_path / "out" / "trials.csv").open())}
    assert rows["spike"]["amplification_rule"].startswith("test: +15 points over M_seed and one-sided familywise")
    assert rows["running"]["undecided_because"] == "the rule's counted cycles (>= 4) not reached: last cycle 1"
    assert rows["early"]["undecided_because"] == "the rule's counted cycles (>= 4) not reached: last cycle 2"
    assert float(rows["spike"]["min_p_value"]) < 0.05 / 2 < float(rows["noisy"]["min_p_value"])
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Amplified by the rule <code>test: +15 points" in page and "last cycle 1" in page
    # the authors' rule: max over j >= 4 of score_j - score_0 >= 15
    assert flags("criterion=delta") == ["", "False", "True", "", "True"]
    assert flags("criterion=delta", "sustained_cycles=2") == ["", "False", "True", "", "False"]
    assert flags("criterion=ci") == ["", "False", "False", "", "True"]
    assert flags("first_cycle=1", "threshold=25") == ["True", "False", "False", "False", "False"]  # not so far

    rows = {row["trial"]: row for row in csv.DictReader((tmp_path / "out" / "trials.csv").open())}
    assert (
        rows["flat"]["amplification_rule"].startswith("test: +25 points over M_seed")
        and not rows["flat"]["undecided_because"]
    )
    assert rows["early"]["status"] == "stopped" and rows["early"]["stop_reason"] == "coherence.mean 80 < 85"
    assert rows["running"]["status"] == "partial" and rows["running"]["cycles"] == "1/5"
    assert "(3 replicas) [partial]" in (tmp_path / "out" / "figures" / "trait-lucky-sft.svg").read_text()
    assert float(rows["spike"]["peak_trait"]) == 60 and rows["spike"]["peak_cycle"] == "4"
    assert float(rows["spike"]["min_coherence"]) == 65 and float(rows["spike"]["bf_slope"]) < 0
    figures = {f["name"]: f["panels"] for f in read_json(tmp_path / "out" / "figures.json")}
    assert figures == {
        "trait-lucky-sft": ["n_sampled = 100", "n_sampled = 200"],
        "tradeoff": ["amplification vs coherence"],
    }


def test_replica_intervals_are_t_intervals_across_replicas(tmp_path):
    from idempo.report.results import ACROSS_REPLICAS, WITHIN_TRIAL, aggregate, load_results

    sweep = tmp_path / "hand"
    # three replicas sharing M_seed (cycle 0 scores 40 +- 3 in each); the third stopped after cycle 1
    _hand_built_trial(sweep, "a", [40, 50, 70], 3, 2, n_sampled=100, seed=0)
    _hand_built_trial(sweep, "b", [40, 60, 80], 3, 2, n_sampled=100, seed=1)
    _hand_built_trial(sweep, "c", [40, 55], 3, 2, n_sampled=100, seed=2)
    write_json(sweep / "trials" / "c" / "stopped.json", {"cycle": 1, "reason": "coherence.mean 20 < 30"})
    _hand_built_trial(sweep, "alone", [40, 45, 50], 3, 2, n_sampled=200, seed=0)
    # a configuration with one finished replica and one still running (its cycle 1 is not its final)
    _hand_built_trial(sweep, "done", [40, 45, 50], 3, 2, n_sampled=300, seed=0)
    _hand_built_trial(sweep, "running", [40, 90], 3, 2, n_sampled=300, seed=1)
    results = load_results(sweep)
    groups = {key: members for key, members in results.replica_groups().items()}
    replicas = groups[(("n_sampled", 100),)]
    seed, first, last = aggregate(replicas, "trait")
    assert seed == (0, 40, 37, 43, 1, WITHIN_TRIAL)  # one shared evaluation, with its own interval
    # cycle 1: 50, 60, 55 -> mean 55, s = 5, se = 5 / sqrt(3), t(0.975, 2) = 4.3026527
    half = 4.3026527 * 5 / math.sqrt(3)
    assert first.interval == ACROSS_REPLICAS and first.n == 3
    assert (first.mean, first.low, first.high) == pytest.approx((55, 55 - half, 55 + half))
    # cycle 2: 70, 80 -> se 5, t(0.975, 1) = 12.7062047
    assert (last.mean, last.low, last.high, last.n) == pytest.approx((75, 75 - 12.7062047 * 5, 75 + 12.7062047 * 5, 2))
    # a configuration of one trial keeps that trial's own interval
    assert [p.interval for p in aggregate(groups[(("n_sampled", 200),)], "trait")] == [WITHIN_TRIAL] * 3

    write_report(sweep, tmp_path / "out")
    rows = {row["n_sampled"]: row for row in csv.DictReader((tmp_path / "out" / "replicas.csv").open())}
    finals = [70, 80, 55]  # final trait of each replica
    mean = sum(finals) / 3
    se = math.sqrt(sum((f - mean) ** 2 for f in finals) / 2 / 3)
    assert rows["100"]["final_trait_ci95"] == f"[{mean - 4.3026527 * se:.1f}, {mean + 4.3026527 * se:.1f}]"
    assert rows["200"]["final_trait_ci95"] == ""  # one replica: no interval
    assert (rows["300"]["replicas"], rows["300"]["complete"], rows["300"]["final_trait"]) == ("2", "1", "50.0")
    assert rows["300"]["final_trait_ci95"] == "" and rows["300"]["peak_trait"] == "50.0"
    # the change from the shared M_seed (40): the same spread, shifted
    assert float(rows["100"]["final_minus_seed"]) == pytest.approx(mean - 40)
    rise = mean - 40
    assert rows["100"]["final_minus_seed_ci95"] == f"[{rise - 4.3026527 * se:.1f}, {rise + 4.3026527 * se:.1f}]"
    svg = (tmp_path / "out" / "figures" / "trait-lucky-sft.svg").read_text()
    assert "shaded: 95% CI across replicas (t, n-1 df)" in svg and "one trial's 95% CI over its eval prompts" in svg


def test_bad_report_options_are_named_before_anything_is_written(tmp_path, capsys):
    sweep = tmp_path / "hand"
    _hand_built_trial(sweep, "a", [40, 50], 3, 1, n_sampled=100)
    _hand_built_trial(sweep, "b", [40, 45], 3, 1, n_sampled=200)
    assert main(["report", str(sweep), "--facet", "n_sampeld"]) == 2
    assert "--facet: 'n_sampeld' is not a config field of these trials; the sweep's axes are n_sampled" in (
        capsys.readouterr().err
    )
    assert main(["report", str(sweep), "--amplification", "sustained=2"]) == 2
    assert "--amplification sustained" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "has no trials/" in capsys.readouterr().err
    assert not (sweep / "report").exists()


def test_wandb_report_offline_says_what_it_would_create(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = tmp_path / "hand"
    _hand_built_trial(sweep, "a", [40, 50], 3, 1, n_sampled=100, seed=0)
    _hand_built_trial(sweep, "b", [40, 45], 3, 1, n_sampled=100, seed=1)
    _hand_built_trial(sweep, "c", [40, 45], 3, 1, n_sampled=200, seed=0)
    assert main(["report", str(sweep), "--wandb", "--wandb-project", "traits"]) == 0
    said = capsys.readouterr().out
    assert "would create the report 'idempo sweep hand' in project traits" in said
    assert "runs where Metric('Group') = 'hand', grouped by config.n_sampled," in said  # seed: replicas
    assert "trait/mean, coherence/mean" in said


def test_replicas_share_m_seed_unless_retrained(tmp_path):
    path = write_sweep(tmp_path, "fig14", axes={"n_sampled": [8]})
    text = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**text, "replicas": 3}))
    shared = load_sweep(path)
    assert [(t.config.seed, t.config.seeding.seed) for t in shared.trials] == [(0, 0), (1, 0), (2, 0)]
    path.write_text(yaml.safe_dump({**text, "replicas": 3, "retrain_seed_model": True}))
    retrained = load_sweep(path)
    assert [(t.config.seed, t.config.seeding.seed) for t in retrained.trials] == [(0, 0), (1, 1), (2, 2)]
    assert [t.name for t in retrained.trials] == [t.name for t in shared.trials]
