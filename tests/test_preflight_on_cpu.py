"""Preflight: every trial-level and sweep-level check runs before any model loads or Ray starts, reports
every trial's problems at once with the trial and field named, and writes nothing."""

import shutil

import pytest
import yaml
from sweep_helpers import TINY_TRIAL, write_sweep

from idempo.artifacts import write_json
from idempo.cli import EXIT_BAD_INPUT, main
from idempo.config import ConfigError
from idempo.preflight import check_sweep, check_trial, stop_metrics
from idempo.sweep import load_sweep

# A hub id that is valid but not on this machine: any attempt to load it fails with a model-load error,
# so a config error in its place shows that the check came first.
ABSENT_MODEL = "example-org/not-downloaded"

BAD_TRIALS = [
    ({"regime": "sdf"}, "regime: 'sdf' trains documents"),
    ({"n_seed": 100000}, "n_seed: got 100000 but"),
    ({"seeding": {"source": "model"}, "n_seed": 100000}, "n_seed: got 100000 but prompts.train has only"),
    ({"persona": "nvidia_bear", "seeding": {"source": "builtin"}}, "seeding.source: got 'builtin' but persona"),
    ({"loading": {"device": "cuda"}}, "loading.device: got 'cuda' but no CUDA GPU is visible"),
    ({"sampling": {"backend": "vllm"}}, "sampling.backend: got 'vllm'"),
    ({"training": {"deepspeed": {"stage": 2}}}, "training.deepspeed:"),
    (
        {"evaluation": {"judge": {"backend": "openai", "model": "m", "api_key_env": "IDEMPO_TEST_UNSET_KEY"}}},
        "evaluation.judge.api_key_env: environment variable IDEMPO_TEST_UNSET_KEY is not set",
    ),
]


@pytest.mark.parametrize("change, fragment", BAD_TRIALS, ids=[f[:30] for _, f in BAD_TRIALS])
def test_a_trial_that_cannot_run_is_refused_before_its_model_loads(tmp_path, capsys, monkeypatch, change, fragment):
    monkeypatch.delenv("IDEMPO_TEST_UNSET_KEY", raising=False)
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump({**TINY_TRIAL, "model": ABSENT_MODEL, **change}))
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out)]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert fragment in message, message
    assert message.startswith("error: invalid config"), message  # not a failed load of ABSENT_MODEL
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial.yaml"]


def test_lora_targets_that_name_no_module_are_refused_with_the_modules_there_are(tmp_path):
    from conftest import tiny_config

    config = tiny_config(training__lora={"target_modules": ["q_proj", "qkv"]})
    with pytest.raises(ConfigError, match=r"target_modules: \['qkv'\] match no module of tiny; .*q_proj, up_proj"):
        check_trial(config, machine=False)
    check_trial(tiny_config(training__lora={"target_modules": ["q_proj", "v_proj"]}), machine=False)
    check_trial(tiny_config(training__lora={"target_modules": r".*\.(q|v)_proj"}), machine=False)


def test_every_problem_of_every_trial_is_reported_at_once(tmp_path):
    path = write_sweep(
        tmp_path,
        "many",
        axes={"n_seed": [8, 100000], "regime": ["sft", "sdf"]},
        run={"stop": {"metric": "coherence.mean", "floor": 30}},
    )
    with pytest.raises(ConfigError) as caught:
        check_sweep(load_sweep(path))
    problems = caught.value.problems
    assert [p for p in problems if "needs a coherence judge" in p][0].startswith("every trial (4): run.stop.metric")
    # the sdf trials stop at their persona (what else they read depends on it)
    assert [p.split(":")[0] for p in problems if "n_seed: got 100000" in p] == ["trial n_seed-100000_regime-sft"]
    assert [p.split(":")[0] for p in problems if "regime: 'sdf'" in p] == [
        "trials n_seed-8_regime-sdf, n_seed-100000_regime-sdf"
    ]
    assert not (tmp_path / "storage").exists()


WHOLE_SHARE = {"gpu_memory_utilization": 0.5}
SPREAD_ENGINE = {"tensor_parallel_size": 4, "gpu_memory_utilization": 0.1}
BAD_SWEEPS = [
    ({"axes": {"n_sampled": [8, 8]}}, "n_sampled lists 8 more than once"),
    ({"axes": {"n_sampled": [8, 8.0]}}, "n_sampled lists 8.0 more than once"),
    ({"replicas": []}, "replicas: got []; an empty list runs no trial"),
    ({"replicas": [3, 1, 3]}, "seed 3 appears more than once"),
    ({"replicas": 0}, "replicas: got 0; must be at least 1"),
    ({"axes": {"n_seed.rows": [1, 2]}}, "axes.n_seed.rows: n_seed is 32, not a section"),
    ({"axes": {"n_sampled": 8}}, "axes.n_sampled: got 8; must be a valid list"),
    ({"axes": {"n_sampled": []}}, "have no values"),
    ({"run": {"stop": {"metric": "coherence.mean", "floor": 30}}}, "needs a coherence judge"),
    ({"run": {"stop": {"metric": "trait.median", "floor": 30}}}, "run.stop.metric: got 'trait.median'; allowed:"),
    ({"config": {"loading": {"device": "cuda:1"}}}, "run.resources.gpus: got 0 but loading.device 'cuda:1'"),
    ({"config": {"sampling": {"backend": "vllm"}}}, "run.resources.gpus: got 0 but sampling.backend 'vllm'"),
    ({"run": {"resources": {"gpus": 0.3}}}, "run.resources.gpus: got 0.3; allowed: 0, a whole number of GPUs, or"),
    ({"run": {"resources": {"gpus": 1.5}}}, "run.resources.gpus: got 1.5; allowed: 0, a whole number"),
    (
        {"run": {"resources": {"gpus": 0.5}}, "config": {"training": {"deepspeed": {"workers": 2}}}},
        "training.deepspeed.workers: got 2 with run.resources.gpus 0.5 (a share of one GPU); ranks beyond",
    ),
    (
        {"run": {"resources": {"gpus": 0.5}}, "config": {"sampling": {"backend": "vllm", "vllm": WHOLE_SHARE}}},
        "sampling.vllm.gpu_memory_utilization: got 0.5 with run.resources.gpus 0.5 (a share of one GPU); the",
    ),
    (
        {"run": {"resources": {"gpus": 0.25}}, "config": {"sampling": {"backend": "vllm", "vllm": SPREAD_ENGINE}}},
        "sampling.vllm.tensor_parallel_size: got 4 with run.resources.gpus 0.25 (a share of one GPU); allowed: 1",
    ),
    ({"config": {"regime": "sdf"}}, "trial base: regime: 'sdf'"),
    ({"config": {"n_seed": 5000}}, "trial base: n_seed: got 5000"),
]


@pytest.mark.parametrize("change, fragment", BAD_SWEEPS, ids=[f[:30] for _, f in BAD_SWEEPS])
def test_a_bad_sweep_is_refused_by_dry_run_with_the_field_named_and_nothing_written(tmp_path, capsys, change, fragment):
    path = write_sweep(tmp_path, "bad")
    raw = yaml.safe_load(path.read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path), "--dry-run"]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert fragment in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_trial_names_that_collide_or_run_long_get_a_hash_and_others_keep_theirs(tmp_path):
    prompts = tmp_path / "a"
    prompts.mkdir()
    for name in ("b.jsonl", "a-b.jsonl"):
        target = tmp_path / name if name == "a-b.jsonl" else prompts / name
        target.write_text('{"prompt": "Why?"}\n' * 40)
    long_value = "x" * 200
    path = write_sweep(
        tmp_path,
        "names",
        axes={"prompts.train": ["a/b.jsonl", "a-b.jsonl"], "evaluation.judge.refusal_mass": [0.25]},
    )
    names = [t.name for t in load_sweep(path).trials]
    assert len(set(names)) == 2 and all(len(n) <= 180 for n in names)
    assert all(n.startswith("train-a-b.jsonl_refusal_mass-0.25-") for n in names), names
    path = write_sweep(tmp_path, "names", axes={"n_sampled": [8, 16]})
    assert [t.name for t in load_sweep(path).trials] == ["n_sampled-8", "n_sampled-16"]  # unchanged

    from idempo.sweep import trial_names

    points = [{"persona": long_value + "1"}, {"persona": long_value + "2"}, {"persona": "short"}]
    cut = trial_names(points)
    assert len(set(cut)) == 3 and all(len(n) <= 180 for n in cut) and cut[2] == "persona-short"


def test_a_resume_after_the_sweep_file_changed_is_refused_with_the_difference(tmp_path, capsys):
    path = write_sweep(tmp_path, "changing", axes={"n_sampled": [8, 16]})
    sweep = load_sweep(path)
    write_json(sweep.directory / "sweep.json", sweep.record())  # what a first run records
    recorded = (sweep.directory / "sweep.json").read_bytes()
    check_sweep(load_sweep(path), resume=True)  # unchanged: resumable

    raw = yaml.safe_load(path.read_text())
    raw["axes"]["n_sampled"] = [8, 32]
    raw["config"]["training"]["learning_rate"] = 1e-3
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path), "--dry-run", "--resume"]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert "--resume: " in message and "changed since the sweep's first run" in message
    assert "trials added: n_sampled-32" in message and "trials removed: n_sampled-16" in message
    assert "trial n_sampled-8: training.learning_rate: 0.003 -> 0.001" in message
    assert (sweep.directory / "sweep.json").read_bytes() == recorded

    # a record from before configs were recorded: the trial set is still compared
    write_json(sweep.directory / "sweep.json", {"name": "changing", "trials": {"n_sampled-8": {}}})
    with pytest.raises(ConfigError, match="trials added: n_sampled-32"):
        check_sweep(load_sweep(path), resume=True)
    shutil.rmtree(sweep.directory)
    check_sweep(load_sweep(path), resume=True)  # nothing recorded: Tune says whether there is state to restore


def test_a_sweep_trial_dir_that_holds_another_config_is_refused_before_ray(tmp_path):
    path = write_sweep(tmp_path, "taken")
    sweep = load_sweep(path)
    other = sweep.trial_dir("base")
    other.mkdir(parents=True)
    (other / "config.yaml").write_text(yaml.safe_dump({**sweep.trials[0].config.to_dict(), "n_sampled": 99}))
    with pytest.raises(ConfigError, match=r"trial base: --out: .* another config \(n_sampled: 99 -> 8\)"):
        check_sweep(sweep)


def test_stop_metrics_are_the_ones_a_cycle_reports(tmp_path):
    """Every metric `run.stop.metric` may name is in a real cycle's metrics (flattened as the stopper reads
    them), for a config with every optional group on."""
    from conftest import tiny_config

    from idempo.loop import run_trial
    from idempo.tracking import flatten

    config = tiny_config(n_seed=16, n_sampled=4, cycles=1, evaluation={"n_prompts": 2, "samples_per_prompt": 2})
    history = run_trial(config, tmp_path / "trial")
    flat = flatten(history[-1])
    missing = [m for m in stop_metrics(config) if m.replace(".", "/") not in flat]
    assert not missing and "branching_factor.mean" in stop_metrics(config)
