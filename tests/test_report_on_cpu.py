"""`idempo report`: on a real sweep (read while it runs, then when done), on a real run dir, on hand-built
artifacts, and on a 144-trial sweep whose artifacts copy a real run's shape, rendered in Chromium."""

import copy
import csv
import html
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweep_helpers import TINY_TRIAL, write_sweep

from idempo.artifacts import read_json, read_jsonl, write_json, write_jsonl, write_text
from idempo.cli import main
from idempo.layout import TrialLayout, stage_cycles
from idempo.report import write_report
from idempo.report.figures import pick_layout
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
    out, results = write_report(sweep.directory, tmp_path / "report", hue="n_seed")  # constant: only when asked
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
    _chromium(out / "index.html", tmp_path, "--window-size=1400,2200", f"--screenshot={shot}")
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


def _chromium(page: Path, tmp_path: Path, *options: str) -> str:
    """Headless Chromium on a page from disk, offline, in a profile of its own; its stdout."""
    done = subprocess.run(
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
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            *options,
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A plain `idempo run` of the tiny model (M_init, M_seed, one cycle, branching factor on): real
    artifacts, whose metrics.json and eval.jsonl the synthetic sweeps copy the shape of."""
    root = tmp_path_factory.mktemp("tiny-run")
    evaluation = {**TINY_TRIAL["evaluation"], "branching_factor": {"enabled": True}}
    (root / "run.yaml").write_text(yaml.safe_dump({**TINY_TRIAL, "cycles": 1, "evaluation": evaluation}))
    assert main(["run", str(root / "run.yaml"), "--out", str(root / "trial"), "--quiet"]) == 0
    return root / "trial"


UNSAFE = '<script>alert("trait 80")</script> & <b>'  # an answer the page must show as text


def _synthetic_sweep(root: Path, name: str, real_trial: Path, axes: dict, replicas: int, **sweep_keys):
    """A sweep with every artifact written here: sweep.json as `idempo sweep` records it, and per trial its
    config.yaml and each stage's metrics.json and eval.jsonl, copies of the real run's with the scores of
    `_story`. Some trials amplify, some are stopped by the coherence floor, some are partial."""
    judge = {"backend": "openai", "model": "judge", "base_url": "http://127.0.0.1:9/v1"}
    evaluation = {**TINY_TRIAL["evaluation"], "coherence_judge": judge} if sweep_keys.pop("judge", True) else None
    path = write_sweep(root, name, axes=axes, config={"cycles": 6, "evaluation": evaluation or {}}, replicas=replicas)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **sweep_keys}, sort_keys=False))
    sweep = load_sweep(path)
    write_json(sweep.layout.record, sweep.record())
    real = TrialLayout(real_trial)
    shapes = {c: (read_json(real.metrics(c)), read_jsonl(real.eval(c))) for c in (-1, 0, 1)}
    for trial in sweep.trials:
        layout = TrialLayout(sweep.trial_dir(trial.name))
        config = trial.config.to_dict()
        write_text(layout.config, yaml.safe_dump(config, sort_keys=False))
        story = _story(config, trial.axes.get("seed", 0))
        for cycle, (trait, coherence) in zip(stage_cycles(config["cycles"]), story["scores"], strict=False):
            metrics, answers = copy.deepcopy(shapes[min(cycle, 1)])
            metrics.update(cycle=cycle, trait=_share(metrics["trait"], trait))
            if evaluation:
                metrics["coherence"] = {k: v for k, v in _share(metrics["trait"], coherence).items() if k != "deff"}
            metrics["branching_factor"] |= {"mean": 50.0 - trait / 4, "ci95": [48.0 - trait / 4, 52.0 - trait / 4]}
            metrics["degeneration"]["distinct_2"] = coherence / 100
            scored = [row for row in answers if not row["bf_only"]]
            for i, row in enumerate(scored):
                row.update(trait=100.0 * (i < round(trait / 100 * len(scored))), coherence=coherence)
            scored[0]["response"] = f"{UNSAFE} cycle {cycle}" if cycle == 1 else scored[0]["response"]
            write_jsonl(layout.eval(cycle), answers)
            write_json(layout.metrics(cycle), metrics)
        if story["stopped"] is not None:
            write_json(layout.stopped, {"cycle": story["stopped"], "reason": "coherence.mean 45 < 50"})
    return sweep


def _story(config: dict, seed: int) -> dict:
    """A trial's (trait, coherence) per stage from M_init on: the trait climbs faster with more seed data
    and continual training; a trial whose coherence falls under 50 is stopped; replica 2 of n_sampled 32
    is still running (partial). M_seed's trait depends on the seed it was trained with."""
    slope = math.log2(config["n_seed"] / 16) * 2 + (3 if config["init"] == "previous" else 0) + seed / 2
    start = 30 + 2 * config["seeding"]["seed"]
    scores = [(10.0, 90.0)] + [(min(95.0, start + slope * c), 90.0 - slope * c * 1.2) for c in range(7)]
    low = next((i - 1 for i, (_, coherence) in enumerate(scores) if coherence < 50), None)
    partial = seed == 2 and config["n_sampled"] == 32
    ends = [low + 2 if low is not None else len(scores), 4 if partial else len(scores)]
    return {"scores": scores[: min(ends)], "stopped": low if low is not None and not partial else None}


def _share(shape: dict, mean: float) -> dict:
    """A trait summary of the real run's shape, for `mean` over 120 answers with its Wilson-like interval."""
    se = math.sqrt(max(mean * (100 - mean), 25) / 120)
    return {
        **shape,
        "mean": mean,
        "n": 120,
        "n_eff": 120.0,
        "clusters": 40,
        "se": se,
        "ci95": [mean - 2 * se, mean + 2 * se],
    }


PROBE = """<script>
addEventListener("load", () => {
  const top = (css) => Math.round(document.querySelector(css).getBoundingClientRect().top + scrollY);
  const at = {summary: top("#summary"), summary_table: top("#summary + .side table"), figure: top("figure img"),
              height: document.documentElement.scrollHeight};
  document.body.setAttribute("data-offsets", JSON.stringify(at));
});
</script></body>"""


def test_a_144_trial_sweep_opens_with_its_summary_and_figures(tiny_run, tmp_path):
    axes = {"init": ["initial", "previous"], "n_sampled": [8, 16, 32], "n_seed": [16, 32, 64, 128]}
    axes |= {"training.schedule": ["constant", "cosine"], "beta": [0.1]}  # beta: an axis of one value
    sweep = _synthetic_sweep(tmp_path, "grid", tiny_run, axes, replicas=3)
    assert len(sweep.trials) == 144
    out = tmp_path / "report"
    assert main(["report", str(sweep.directory), "--out", str(out)]) == 0

    trials = list(csv.DictReader((out / "trials.csv").open()))
    assert {row["status"] for row in trials} == {"complete", "stopped", "partial"}
    assert {row["amplified"] for row in trials} == {"True", "False", ""}
    # the summary: every value of every varying axis, its trial count and amplified k/n as trials.csv has them
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [(row["axis"], row["value"]) for row in summary] == [("all", "")] + [
        (axis, str(value)) for axis, values in axes.items() if len(values) > 1 for value in values
    ]
    for row in summary:
        members = [t for t in trials if row["axis"] == "all" or t[row["axis"]] == row["value"]]
        decided = [t["amplified"] for t in members if t["amplified"]]
        assert int(row["trials"]) == len(members)
        assert row["amplified"] == f"{decided.count('True')}/{len(decided)}"
        rises = [float(t["final_trait"]) - float(t["seed_trait"]) for t in members]
        assert float(row["median_final_minus_seed"]) == pytest.approx(statistics.median(rises))
        assert float(row["lowest_coherence"]) == min(float(t["min_coherence"]) for t in members)

    # the figures: defaults from the axes, at most 8 lines a panel, every metric, no constant field in a label
    figures = read_json(out / "figures.json")
    assert [f["name"] for f in figures] == ["trait-lucky-sft", "tradeoff"]
    trait = figures[0]
    assert trait["images"] == ["trait-lucky-sft", "coherence-lucky-sft", "branching-lucky-sft", "distinct2-lucky-sft"]
    assert len(trait["panels"]) == 6 and trait["panels"][0] == "schedule = constant, n_sampled = 8"
    assert max(trait["lines"]) == 8
    svg = (out / "figures" / "trait-lucky-sft.svg").read_text()
    assert "n_seed=128, init=previous (3 replicas)" in svg and "persona=" not in svg and "beta" not in svg
    assert "<!-- \u22121 -->" in svg  # M_init's cycle is on the x axis
    assert "cycles &gt;= 4" in (out / "figures" / "tradeoff.svg").read_text()  # the verdict's first counted cycle

    # sampled answers of one replica per configuration, escaped; the page stays small
    page = (out / "index.html").read_text()
    assert page.count("<details><summary title=") == 48 and "48 of 144 trials" in page
    assert html.escape(UNSAFE) in page and UNSAFE not in page
    assert len(page) < 1_000_000

    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium package to render the page")
    from PIL import Image

    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", PROBE))
    dom = _chromium(probe, tmp_path, "--window-size=1366,768", "--virtual-time-budget=10000", "--dump-dom")
    found = re.search(r'data-offsets="([^"]+)"', dom)
    assert found, dom[-2000:]
    at = json.loads(html.unescape(found.group(1)))
    assert at["summary"] < at["summary_table"] < at["figure"] < 768, at  # the first screen shows both
    first, full = tmp_path / "report-144-first-screen.png", tmp_path / "report-144-full-page.png"
    _chromium(out / "index.html", tmp_path, "--window-size=1366,768", f"--screenshot={first}")
    _chromium(out / "index.html", tmp_path, f"--window-size=1366,{min(at['height'], 16000)}", f"--screenshot={full}")
    if os.environ.get("IDEMPO_SCREENSHOTS"):
        Path(os.environ["IDEMPO_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        for shot in (first, full):
            shutil.copy(shot, Path(os.environ["IDEMPO_SCREENSHOTS"]) / shot.name)
    with Image.open(first) as image:
        assert image.size == (1366, 768)
        counts = {colour: n for n, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
        hues = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28)]  # n_seed's colours
        assert sum(counts.get(hue, 0) for hue in hues) > 200  # the first figure's lines are on the first screen


def test_a_plain_run_dir_is_a_report_of_one_trial(tiny_run, tmp_path, capsys):
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "out")]) == 0
    assert "report of trial (1 trials: 1 complete)" in capsys.readouterr().out
    (row,) = csv.DictReader((tmp_path / "out" / "trials.csv").open())
    assert (row["trial"], row["status"], row["cycles"]) == ("trial", "complete", "1/1")
    figure = read_json(tmp_path / "out" / "figures.json")[0]
    assert figure["panels"] == ["all trials"] and figure["lines"] == [1]
    assert figure["images"] == ["trait-lucky-sft", "branching-lucky-sft", "distinct2-lucky-sft"]
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<h1>Trial <code>trial</code></h1>" in page
    answers = [r for r in read_jsonl(TrialLayout(tiny_run).eval(1)) if not r["bf_only"]]
    assert html.escape(answers[0]["response"]) in page  # a real answer, in the sampled answers
    shown = page[page.index('id="answers"') :]
    assert f"<td>1</td><td>{answers[0]['trait']:.4g}</td><td>-</td>" in shown and "refused" not in shown


def test_two_sweeps_make_one_report_with_the_sweep_as_an_axis(tiny_run, tmp_path, monkeypatch):
    axes = {"n_sampled": [8, 16]}
    same = _synthetic_sweep(tmp_path / "same", "fig14", tiny_run, axes, replicas=3, judge=False)
    retrained = _synthetic_sweep(
        tmp_path / "retrained", "fig14", tiny_run, axes, replicas=3, judge=False, retrain_seed_model=True
    )
    monkeypatch.chdir(tmp_path)  # several dirs: ./report unless --out says otherwise
    assert main(["report", str(same.directory), str(retrained.directory), "--answers", "1"]) == 0
    out = tmp_path / "report"
    labels = ["same/storage/fig14", "retrained/storage/fig14"]  # one name: told apart by their dirs
    groups = list(csv.DictReader((out / "replicas.csv").open()))
    assert [(g["sweep"], g["n_sampled"], g["replicas"]) for g in groups] == [
        (label, n, "3") for label in labels for n in ("8", "16")
    ]
    trials = list(csv.DictReader((out / "trials.csv").open()))
    seeds = {label: {t["seed_trait"] for t in trials if t["sweep"] == label} for label in labels}
    assert (len(seeds[labels[0]]), len(seeds[labels[1]])) == (1, 3)  # shared M_seed vs retrained ones
    summary = {(row["axis"], row["value"]): row for row in csv.DictReader((out / "summary.csv").open())}
    assert summary[("sweep", labels[1])]["trials"] == "6" and summary[("all", "")]["lowest_coherence"] == "no judge"
    assert float(summary[("all", "")]["lowest_distinct_2"]) > 0
    page = (out / "index.html").read_text()
    assert f"<code>{same.directory}</code>, <code>{retrained.directory}</code>" in page  # the dirs it read
    comparison = page[page.index('id="configurations"') : page.index('id="trials"')]
    assert all(comparison.count(f">{label}<") == 2 for label in labels)
    assert read_json(out / "figures.json")[0]["lines"] == [2, 2]  # sweep as the hue, n_sampled as columns


def test_default_layouts_keep_every_panel_to_8_lines():
    # sft-personas, per persona: n_seed 3 x n_sampled 3 x init 2 x schedule 2
    sizes = {"n_seed": 3, "n_sampled": 3, "init": 2, "training.schedule": 2}
    assert pick_layout(sizes) == {
        "rows": ["training.schedule"],
        "cols": ["n_sampled"],
        "hue": ["n_seed"],
        "style": ["init"],
    }
    assert pick_layout({"init": 2, "n_sampled": 2}) == {"rows": [], "cols": ["n_sampled"], "hue": ["init"], "style": []}
    assert pick_layout({"n_seed": 12}) == {"rows": [], "cols": ["n_seed"], "hue": [], "style": []}  # too many colours
    chosen = pick_layout({"n_seed": 4, "n_sampled": 3, "init": 2}, hue="n_sampled", rows="n_seed")
    assert chosen == {"rows": ["n_seed"], "cols": [], "hue": ["n_sampled"], "style": ["init"]}
    for counts in itertools.product([1, 2, 3, 4, 6, 9], repeat=4):
        sizes = dict(zip(["a", "b", "c", "d"], counts, strict=True))
        layout = pick_layout(sizes)
        assert sorted(axis for axes in layout.values() for axis in axes) == ["a", "b", "c", "d"]
        assert math.prod(sizes[axis] for axis in layout["hue"] + layout["style"]) <= 8, layout
