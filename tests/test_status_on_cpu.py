"""Cycle lines within 100 columns under one header, and `idempo status` reading each state of a trial from
the files a sweep leaves: Tune's error records, stopped.json, progress.json and the cycles' metrics."""

import json
import os
import socket
import subprocess
import sys
import time

import yaml

from idempo.artifacts import write_json
from idempo.cli import main
from idempo.layout import SweepLayout, TrialLayout
from idempo.progress import HEADER, Reporter, summary_line
from idempo.status import WIDTH, trial_states

LONGEST = {  # the widest values a cycle's metrics.json holds in practice
    "cycle": 120,
    "generation": "000-seed",
    "trait": {"mean": 100.0, "ci95": [100.0, 100.0], "judge": "openai:gpt-4.1-mini-2025-04-14"},
    "coherence": {"mean": 100.0},
    "branching_factor": {"mean": 12345.67},  # the entropy estimator is not clipped
    "degeneration": {"distinct_2": 1.0, "repeated_4gram_rate": 1.0, "mean_words": 12345.6},
    "train": {"first_loss": 123.456, "final_loss": 110.12},
    "data": {"pairs": 9999, "prompts": 9999, "n": 9999},
    "timing_s": {"total": 99999.9, "sample": 1.0},  # 28 hours
}


def test_cycle_lines_fit_100_columns_under_a_header_printed_once(capsys):
    line = summary_line(LONGEST)
    assert len(f"{999:>3} {line}") <= 100 and len(line) == len(HEADER)  # a sweep driver puts a trial's number first
    assert HEADER.split() == [
        "gen", "trait", "95%", "CI", "coher", "BF", "dist2", "rep4", "words", "loss", "rows", "time",
    ]  # fmt: skip
    cells = line.split()
    assert cells[0] == "000-seed" and cells[1] == "100.0" and cells[-2] == "9999/9999"
    assert "123.5>110.1" in line and "100000s" in line
    for name, value in zip(["coher", "BF", "dist2", "rep4"], ["100.0", "12346", "1.00", "1.00"], strict=True):
        end = HEADER.index(name) + len(name)  # right-aligned under its header
        assert line[end - len(value) : end] == value, (name, line)
    plain = {**LONGEST, "coherence": None, "branching_factor": None, "train": {}, "data": None, "timing_s": {}}
    assert summary_line(plain).split()[-6:] == ["1.00", "1.00", "12346", "-", "-", "n/a"]

    reporter = Reporter()
    reporter.cycle(LONGEST)
    reporter.cycle(LONGEST, resumed=True)
    reporter.cycle(LONGEST, shared=True)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == HEADER and printed.count(HEADER) == 1 and len(printed) == 4
    assert printed[2].endswith("earlier") and printed[3].endswith("shared")


def _metrics(layout: TrialLayout, *cycles: int, trait: float = 50.0) -> None:
    for cycle in cycles:
        write_json(layout.metrics(cycle), {"cycle": cycle, "trait": {"mean": trait}})


RAY_FAILURE = """Failure # 1 (occurred at 2026-12-05_06-10-11)
ray::ImplicitFunc.train() (pid=4242, ip=10.0.0.2, actor_id=abc, repr=train_trial)
  File "/site-packages/ray/tune/trainable/function_trainable.py", line 45, in _trainable_func
    return self._trainable_func(self.config)
  File "/idempo/tune.py", line 151, in _inject_fault
    raise RuntimeError(f"injected fault after cycle {cycle} ({FAULT_AFTER_CYCLE})")
RuntimeError: injected fault after cycle 1 (IDEMPO_FAULT_AFTER_CYCLE)
"""


def test_status_reads_every_state_from_the_artifacts(tmp_path, capsys):
    sweep = SweepLayout(tmp_path / "sweep")
    names = ["pending", "sampling", "training", "stopped", "failed", "retried", "refused", "done", "interrupted"]
    write_json(sweep.record, {"trials": {n: {} for n in names}, "configs": {n: {"cycles": 3} for n in names}})
    layouts = {n: TrialLayout(sweep.trial(n)) for n in names if n != "pending"}
    for layout in layouts.values():
        layout.config.parent.mkdir(parents=True)
        layout.config.write_text(yaml.safe_dump({"cycles": 3}))
    now = time.time()
    here = {"host": socket.gethostname(), "pid": os.getpid()}

    _metrics(layouts["sampling"], -1, 0, 1)
    write_json(layouts["sampling"].progress, {"cycle": 2, "phase": "sampling", "since": now - 75, **here})
    _metrics(layouts["training"], -1)  # no progress.json: the phase from the seed stage's files
    write_json(layouts["training"].data(0), {"prompt": "q", "response": "a"})
    _metrics(layouts["stopped"], -1, 0, 1, 2, trait=12.5)
    write_json(layouts["stopped"].stopped, {"cycle": 2, "reason": "coherence.mean 20.0 < floor 30 at cycle 2"})
    _metrics(layouts["done"], -1, 0, 1, 2, 3, trait=80.0)
    _metrics(layouts["interrupted"], -1, 0)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {"host": socket.gethostname(), "pid": int(finished.stdout)}  # a process that has exited
    write_json(layouts["interrupted"].progress, {"cycle": 1, "phase": "training", "since": now - 5, **gone})

    def tune_trial(name: str, error: str, config_error: list[str] | None = None):
        directory = sweep.tune / f"train_trial_{name}_00000"
        write_json(directory / "params.json", {"trial": name, "n_sampled": 4})
        (directory / "error.txt").write_text(error)
        if config_error:
            write_json(SweepLayout.config_error(directory), {"run": "x", "problems": config_error})
        return directory

    _metrics(layouts["failed"], -1, 0, 1)
    write_json(layouts["failed"].progress, {"cycle": 2, "phase": "training", "since": now - 30, **here})
    os.utime(layouts["failed"].progress, (now - 30, now - 30))
    tune_trial("failed", RAY_FAILURE + RAY_FAILURE.replace("# 1", "# 2").replace("cycle 1", "cycle 2"))
    _metrics(layouts["retried"], -1, 0, 1)
    error = tune_trial("retried", RAY_FAILURE)
    os.utime(error / "error.txt", (now - 60, now - 60))  # the retry has made progress since
    write_json(layouts["retried"].progress, {"cycle": 2, "phase": "evaluating", "since": now - 3, **here})
    tune_trial("refused", RAY_FAILURE, ["loading.device: got 'cuda' but no CUDA GPU is visible"])

    states = {s.name: s for s in trial_states(sweep.root, now)}
    assert [states[n].state for n in names] == [
        "pending", "running", "running", "stopped", "failed", "running", "failed", "done", "interrupted",
    ]  # fmt: skip
    assert (states["sampling"].cycle, states["sampling"].detail) == (2, "sampling for 1m15s")
    assert (states["training"].cycle, states["training"].detail) == (0, "training")
    assert states["stopped"].detail.startswith("coherence.mean 20.0 < floor 30") and states["stopped"].trait == 12.5
    assert states["failed"].detail == "RuntimeError: injected fault after cycle 2 (IDEMPO_FAULT_AFTER_CYCLE)"
    assert states["failed"].cycle == 1 and states["retried"].detail.startswith("evaluating for")
    assert states["refused"].detail == "loading.device: got 'cuda' but no CUDA GPU is visible"
    assert (states["done"].cycle, states["done"].trait) == (3, 80.0)

    assert main(["status", str(sweep.root)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert all(len(line) <= WIDTH for line in printed)
    assert printed[2].split()[:6] == ["2", "sampling", "running", "2/3", "50.0", "sampling"]
    assert printed[1].split() == ["1", "pending", "pending", "-", "-"]
    assert printed[-1] == "9 trials: 3 running, 1 pending, 1 interrupted, 2 failed, 1 stopped, 1 done"


def test_status_of_a_plain_run_dir_shows_its_cycle_lines(tmp_path, capsys):
    layout = TrialLayout(tmp_path / "run")
    layout.config.parent.mkdir(parents=True)
    layout.config.write_text(yaml.safe_dump({"cycles": 0}))
    for cycle in (-1, 0):
        write_json(layout.metrics(cycle), {**LONGEST, "cycle": cycle, "generation": ["init", "000-seed"][cycle + 1]})
    assert main(["status", str(layout.root), "--watch", "0.01"]) == 0  # settled at once: no second print
    printed = capsys.readouterr().out
    assert printed.count(HEADER) == 1 and printed.count("1 trial: 1 done") == 1
    assert summary_line(json.loads(layout.metrics(0).read_text())) in printed
