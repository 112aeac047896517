"""A trial's phase timeline: written as phases begin and end, kept across runs, and a GPU's busy share
computed from hand-written timelines."""

import pytest

from idempo.artifacts import write_json
from idempo.layout import SweepLayout, TrialLayout
from idempo.status import gpu_busy_shares
from idempo.timeline import PhaseTimeline, busy_share, overlaps, read_phases


def phase(name, start, end, gpu=None, cycle=1):
    gpu = name in ("sample", "train", "eval") if gpu is None else gpu
    return {"cycle": cycle, "phase": name, "gpu": gpu, "start": start, "end": end}


# Two trials on one GPU, by hand: GPU phases of A 0-2, 3-7, 7-8; of B 0-1, 4-6, 8-10.
A = [phase("sample", 0, 2), phase("sleep", 2, 3), phase("train", 3, 7), phase("eval", 7, 8)]
B = [phase("eval", 0, 1), phase("judge", 1, 4), phase("sample", 4, 6), phase("train", 8, 10), phase("eval", 10, None)]


def test_busy_share_is_the_union_of_gpu_phases_over_the_wall_time():
    assert busy_share([A]) == pytest.approx(7 / 8)  # idle while A slept
    assert busy_share([B]) == pytest.approx(5 / 10)  # judged 1-4, nothing 6-8; the open eval does not count
    assert busy_share([A, B]) == pytest.approx(9 / 10)  # only 2-3 is idle: A sleeps, B waits on its judge
    assert busy_share([A, A]) == busy_share([A])  # one trial twice is no busier
    assert busy_share([]) is None and busy_share([[phase("train", 5, None)]]) is None


def test_overlaps_find_one_trial_training_while_the_other_samples_or_evaluates():
    assert overlaps(A, B, ({"train"}, {"sample", "eval"})) == [(4, 6)]
    assert overlaps(B, A, ({"train"}, {"sample", "eval"})) == []  # B trains 8-10, A ended at 8
    assert overlaps(A, B, ({"sleep"}, {"train"})) == []


def test_the_timeline_shows_a_phase_while_it_runs_and_keeps_earlier_runs(tmp_path):
    path = tmp_path / "timeline.json"
    timeline = PhaseTimeline(path)
    with timeline.phase(-1, "eval"):
        (running,) = read_phases(path)
        assert running["phase"] == "eval" and running["gpu"] and running["end"] is None
    with pytest.raises(RuntimeError), timeline.phase(0, "seed data", gpu=False):
        raise RuntimeError("a phase that fails still ends")
    first = read_phases(path)
    assert [(p["cycle"], p["phase"], p["gpu"]) for p in first] == [(-1, "eval", True), (0, "seed data", False)]
    assert all(p["start"] <= p["end"] for p in first)
    with PhaseTimeline(path).phase(0, "judge"):  # a later run of the trial adds to the list
        pass
    assert read_phases(path)[:2] == first and read_phases(path)[2]["gpu"] is False
    path.write_text("{not json")
    assert read_phases(path) == []  # a damaged timeline costs its record of time, never the trial


def test_a_sweeps_busy_share_is_per_gpu_from_placement_and_timelines(tmp_path):
    sweep = SweepLayout(tmp_path / "sweep")
    for name, gpus, phases in (("a", ["0"], A), ("b", ["0"], B), ("c", ["1"], [phase("train", 0, 4)])):
        layout = TrialLayout(sweep.trial(name))
        layout.root.mkdir(parents=True)
        write_json(layout.placement, {"gpu_ids": gpus, "node": "n1", "bundles": []})
        write_json(layout.timeline, {"phases": phases})
    TrialLayout(sweep.trial("pending")).root.mkdir()  # no placement yet
    cpu = TrialLayout(sweep.trial("cpu"))
    cpu.root.mkdir()
    write_json(cpu.placement, {"gpu_ids": [], "node": "n1", "bundles": []})
    assert gpu_busy_shares(sweep.root) == {"n1:0": pytest.approx(0.9), "n1:1": 1.0}
    assert gpu_busy_shares(tmp_path / "none") == {}
