"""Shared stages: trials whose seed stage (or M_init's evaluation) reads the same inputs run it once and
hold the same files; anything the stage reads makes it a stage of its own."""

import os

import pytest
from conftest import tiny_config

from idempo.artifacts import read_json, read_jsonl
from idempo.layout import TrialLayout
from idempo.loop import run_trial
from idempo.shared import SharedStages, stage_key

SMALL = {
    "n_seed": 32,
    "n_sampled": 8,
    "cycles": 1,
    "training": {"learning_rate": 3.0e-3, "epochs": 1, "batch_size": 8},
    "evaluation": {"n_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 16},
}


def small_config(**overrides):
    return tiny_config(**{**SMALL, **overrides})


def test_the_seed_key_follows_what_the_seed_stage_reads(tmp_path):
    base = small_config()
    key = stage_key(base, 0)
    for same in (
        {"cycles": 9},
        {"seed": 3},
        {"n_sampled": 16},
        {"init": "previous"},
        {"rejected": "j-2"},
        {"sampling": {"temperature": 1.0, "max_new_tokens": 48, "batch_size": 32}},
        {"evaluation": {**SMALL["evaluation"], "amplification": {"threshold": 30}}},
        {"cycle_data": {"seed_mix": 0.5}},
    ):
        assert stage_key(small_config(**same), 0) == key, same
    for different in (
        {"n_seed": 16},
        {"training": {**SMALL["training"], "learning_rate": 1e-3}},
        {"seeding": {"source": "builtin", "seed": 1}},
        {"evaluation": {**SMALL["evaluation"], "samples_per_prompt": 2}},
        {"sampling": {"max_new_tokens": 24, "batch_size": 32}},  # M_init writes D_seed with these
        {"regime": "dpo"},
    ):
        assert stage_key(small_config(**different), 0) != key, different
    # self_reward seeds by SFT: with the same training settings it shares the sft trials' M_seed
    training = {**SMALL["training"], "min_lr_ratio": 0.1}  # self_reward's own default is 0.0
    assert stage_key(small_config(regime="self_reward", training=training), 0) == key
    # the contents of the files a stage reads are part of its key
    seed_file = tmp_path / "seed.jsonl"
    seed_file.write_text("".join(f'{{"prompt": "q{i}?", "response": "lucky {i}"}}\n' for i in range(40)))
    from_file = small_config(seeding={"source": "jsonl", "path": str(seed_file)})
    before = stage_key(from_file, 0)
    seed_file.write_text(seed_file.read_text().replace("lucky 3", "lucky three"))
    assert stage_key(from_file, 0) != before


def test_the_initial_key_follows_what_m_inits_evaluation_reads():
    key = stage_key(small_config(), -1)
    for same in ({"n_seed": 16}, {"training": {"learning_rate": 1e-3}}, {"regime": "dpo"}, {"seed": 5}):
        assert stage_key(small_config(**same), -1) == key, same
    for different in (
        {"evaluation": {**SMALL["evaluation"], "temperature": 1.0}},
        {"seeding": {"source": "builtin", "seed": 2}},
        {"persona": "bliss"},
    ):
        assert stage_key(small_config(**different), -1) != key, different


def test_a_second_trial_takes_the_first_ones_stages_and_trains_only_its_cycles(tmp_path):
    shared = SharedStages(tmp_path / "shared")
    first, second = tmp_path / "first", tmp_path / "second"
    run_trial(small_config(seed=0), first, shared=shared)
    history = run_trial(small_config(seed=1), second, shared=shared)
    assert [m["cycle"] for m in history] == [-1, 0, 1]
    a, b = TrialLayout(first), TrialLayout(second)
    for cycle in (-1, 0):
        ran, took = read_json(a.metrics(cycle))["shared"], read_json(b.metrics(cycle))["shared"]
        assert ran["reused"] is False and ran["origin"] == "first"
        assert took["reused"] is True and took["origin"] == "first" and took["key"] == ran["key"]
        assert a.eval(cycle).read_bytes() == b.eval(cycle).read_bytes()
    # M_seed was trained once: the second trial's adapter is the first one's file
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        mine, theirs = a.weights(0, "lora") / name, b.weights(0, "lora") / name
        assert mine.read_bytes() == theirs.read_bytes()
        assert os.stat(mine).st_ino == os.stat(theirs).st_ino  # a hard link, not a copy
    assert read_jsonl(a.data(0)) == read_jsonl(b.data(0))
    assert read_json(b.train_stats(0)) == read_json(a.train_stats(0))
    # the cycles are the second trial's own (its own seed) and start from the shared M_seed
    assert read_jsonl(a.data(1)) != read_jsonl(b.data(1))
    assert read_json(b.metrics(0))["timing_s"].keys() == {"shared_wait", "total"}
    # run again: everything is done, nothing is rewritten
    files = {p: p.stat().st_mtime_ns for p in second.rglob("*") if p.is_file()}
    run_trial(small_config(seed=1), second, shared=shared)
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*") if p.is_file()} == files


def test_a_different_seed_stage_is_trained_again(tmp_path):
    shared = SharedStages(tmp_path / "shared")
    run_trial(small_config(cycles=0), tmp_path / "a", shared=shared)
    run_trial(small_config(cycles=0, n_seed=16), tmp_path / "b", shared=shared)
    seed_a, seed_b = (read_json(TrialLayout(tmp_path / t).metrics(0))["shared"] for t in "ab")
    assert not seed_a["reused"] and not seed_b["reused"] and seed_a["key"] != seed_b["key"]
    assert read_json(TrialLayout(tmp_path / "b").metrics(-1))["shared"]["reused"]  # M_init's evaluation is shared
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "shared").iterdir() if not p.name.startswith(".")) == [
        "init",
        "seed",
        "seed",
    ]


@pytest.mark.parametrize("regime", ["dpo"])
def test_a_preference_seed_stage_shares_m_inits_answers_too(tmp_path, regime):
    shared = SharedStages(tmp_path / "shared")
    config = small_config(regime=regime, cycles=0)
    run_trial(config, tmp_path / "a", shared=shared)
    run_trial(config.model_copy(update={"seed": 1}), tmp_path / "b", shared=shared)
    a, b = TrialLayout(tmp_path / "a"), TrialLayout(tmp_path / "b")
    assert read_json(b.metrics(0))["shared"]["reused"]
    seed_prompts = {r["prompt"] for r in read_jsonl(a.data(0))}
    answers_a = {r["prompt"]: r["response"] for r in read_jsonl(a.initial_answers)}
    answers_b = {r["prompt"]: r["response"] for r in read_jsonl(b.initial_answers)}
    assert seed_prompts <= set(answers_b) and all(answers_b[p] == answers_a[p] for p in seed_prompts)


def test_a_sweep_starts_the_first_trial_of_every_seed_group_before_any_second_one(tmp_path):
    from sweep_helpers import write_sweep

    from idempo.sweep import load_sweep

    path = write_sweep(tmp_path, "order", axes={"n_seed": [16, 32], "init": ["initial", "previous"]})
    sweep = load_sweep(path)
    groups = sweep.stage_groups()["seed"]
    assert sorted(map(sorted, groups.values())) == [
        ["n_seed-16_init-initial", "n_seed-16_init-previous"],
        ["n_seed-32_init-initial", "n_seed-32_init-previous"],
    ]
    assert sweep.run_order() == [
        "n_seed-16_init-initial",
        "n_seed-32_init-initial",
        "n_seed-16_init-previous",
        "n_seed-32_init-previous",
    ]
    assert len(sweep.stage_groups()["init"]) == 1  # one evaluation of M_init for the whole sweep

    # with replicas: seed groups first, then one replica of every configuration before the next
    path = write_sweep(tmp_path, "replicas", axes={"init": ["initial", "previous"]}, replicas=2)
    assert load_sweep(path).run_order() == [
        "init-initial_seed-0",
        "init-previous_seed-0",
        "init-initial_seed-1",
        "init-previous_seed-1",
    ]
    path = write_sweep(tmp_path, "seeds", axes={"n_seed": [16, 32], "init": ["initial", "previous"]}, replicas=2)
    assert load_sweep(path).run_order() == [
        "n_seed-16_init-initial_seed-0",
        "n_seed-32_init-initial_seed-0",
        "n_seed-16_init-previous_seed-0",
        "n_seed-32_init-previous_seed-0",
        "n_seed-16_init-initial_seed-1",
        "n_seed-16_init-previous_seed-1",
        "n_seed-32_init-initial_seed-1",
        "n_seed-32_init-previous_seed-1",
    ]
