"""What a trial reuses is what it wrote: damaged files are refused by name and nothing is changed; the
lock comes before anything else; cleanup touches only idempo's own temporary files; every file has the
usual permissions; settings that cannot change results may change on resume."""

import gc
import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, tiny_config

from idempo.artifacts import read_json
from idempo.cli import main
from idempo.layout import TrialConflict, TrialLayout, resumable
from idempo.loop import Trial, run_trial
from idempo.models import ModelLoadError
from idempo.progress import Reporter
from idempo.records import MANIFEST, DamagedArtifact
from idempo.shared import SharedStages

SMALL = {
    "n_seed": 8,
    "n_sampled": 4,
    "cycles": 1,
    "sampling": {"max_new_tokens": 8, "batch_size": 8},
    "training": {"learning_rate": 3.0e-3, "epochs": 1, "batch_size": 4},
    "evaluation": {"n_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 8},
}


def small_config(**overrides):
    return tiny_config(**{**SMALL, **overrides})


def snapshot(root):
    """Every path under `root` (hidden ones too), with the sha256 of each file's contents."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 1-cycle trial run straight through; tests work on copies."""
    out = tmp_path_factory.mktemp("safety") / "finished"
    run_trial(small_config(), out)
    return out


def copy_of(finished, tmp_path, name="trial"):
    out = tmp_path / name
    shutil.copytree(finished, out)
    return out


def unfinish(layout, cycle, keep=("samples.jsonl", MANIFEST)):
    """Cycle `cycle` as a run killed after its sampling left it: only its data file (and its record)."""
    for path in layout.cycle_dir(cycle).iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def refused(out, config, match):
    """The trial at `out` fails with DamagedArtifact matching `match`, and nothing on disk changes."""
    before = snapshot(out)
    with pytest.raises(DamagedArtifact, match=match) as caught:
        run_trial(config, out)
    assert snapshot(out) == before
    message = str(caught.value)
    del caught
    gc.collect()  # the failed trial's lock goes with it (a process that fails exits and releases it)
    return message


# -- damaged artifacts ----------------------------------------------------------------------------


def test_a_truncated_samples_file_of_an_unfinished_cycle_is_refused(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    layout = TrialLayout(out)
    unfinish(layout, 1)
    samples = layout.data(1)
    samples.write_bytes(samples.read_bytes()[: len(samples.read_bytes()) // 2])
    message = refused(out, small_config(), r"samples\.jsonl: changed since idempo wrote it: expected 4 rows")
    assert re.search(r"found [0-3] rows", message), message
    assert f"delete {layout.cycle_dir(1)} to redo cycle 1" in message


def test_an_empty_samples_file_is_refused_not_trained_on(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    layout = TrialLayout(out)
    unfinish(layout, 1)
    layout.data(1).write_text("")
    message = refused(out, small_config(), r"samples\.jsonl: changed since idempo wrote it")
    assert "expected 4 rows" in message and "found 0 rows, 0 bytes" in message
    # without a record (a file of an earlier idempo) an empty data file is refused too
    (layout.cycle_dir(1) / MANIFEST).unlink()
    refused(out, small_config(), r"samples\.jsonl: holds no rows")
    assert not layout.is_complete(1)


def test_a_truncated_metrics_file_is_refused_naming_it_and_the_cycles_to_redo(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    layout = TrialLayout(out)
    metrics = layout.metrics(0)
    metrics.write_bytes(metrics.read_bytes()[:100])
    message = refused(out, small_config(), r"000-seed/metrics\.json: changed since idempo wrote it")
    assert f"delete {layout.cycle_dir(0)} to redo cycle 0; later cycles, which build on it" in message
    assert str(layout.cycle_dir(1)) in message
    # a file without a record is still parsed: the parse error names the file
    (layout.cycle_dir(0) / MANIFEST).unlink()
    refused(out, small_config(), r"000-seed/metrics\.json: not JSON")


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_adapter_weights_are_refused_before_they_are_used(finished, tmp_path, damage):
    out = copy_of(finished, tmp_path)
    layout = TrialLayout(out)
    shutil.rmtree(layout.cycle_dir(1))  # cycle 1 samples from M_seed: it must read M_seed's adapter
    weights = layout.weights(0, "lora") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 1000]
    weights.write_bytes(bytes(data))
    message = refused(out, small_config(), r"000-seed/adapter: not the weights idempo wrote")
    assert "adapter_model.safetensors: expected" in message and f"delete {layout.cycle_dir(0)}" in message


def test_a_truncated_adapter_without_a_record_is_refused_too(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    layout = TrialLayout(out)
    shutil.rmtree(layout.cycle_dir(1))
    (layout.cycle_dir(0) / MANIFEST).unlink()  # as written by an idempo that kept no records
    weights = layout.weights(0, "lora") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    refused(out, small_config(), r"adapter_model\.safetensors: .* bytes, but its safetensors header describes")


def test_a_damaged_shared_stage_is_refused_before_it_is_linked_in(tmp_path):
    shared = SharedStages(tmp_path / "shared")
    run_trial(small_config(cycles=0), tmp_path / "a", shared=shared)
    (entry,) = (tmp_path / "shared").glob("seed-*")
    weights = entry / "cycle" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedArtifact, match=rf"{entry.name}/cycle/adapter: not the weights idempo wrote"):
        run_trial(small_config(cycles=0, seed=1), tmp_path / "b", shared=shared)
    assert not TrialLayout(tmp_path / "b").cycle_dir(0).exists()


def test_a_resumed_trial_checks_what_it_reuses_and_the_result_is_unchanged(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    layout = TrialLayout(out)
    unfinish(layout, 1)
    run_trial(small_config(), out)
    assert layout.data(1).read_bytes() == TrialLayout(finished).data(1).read_bytes()
    assert read_json(layout.metrics(1))["trait"] == read_json(TrialLayout(finished).metrics(1))["trait"]
    manifest = read_json(layout.cycle_dir(1) / MANIFEST)
    assert set(manifest) == {"samples.jsonl", "adapter", "train.json", "eval.jsonl", "metrics.json"}
    assert manifest["samples.jsonl"]["rows"] == 4


# -- cleanup and the output dir -------------------------------------------------------------------


def test_cleanup_removes_only_idempos_own_temporary_files_in_the_trials_own_dirs(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    other = out / "other-trial" / "cycles" / "001"
    other.mkdir(parents=True)
    theirs = [other / ".samples.jsonl.abcd1234.tmp", other / ".x.tmp", out / "notes.tmp", out / ".mine.tmp"]
    theirs += [out / "cycles" / "001" / "reeval" / ".eval.jsonl.idempo-abcd1234.tmp"]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not idempo's to delete")
    own = [out / "cycles" / "001" / ".samples.jsonl.idempo-k3j4h5g6.tmp", out / ".config.yaml.q1w2e3r4.tmp"]
    for path in own:
        path.write_text("half-written")
    (out / "cycles" / ".002.idempo-z9x8c7v6.tmp").mkdir()  # an atomic_dir a killed run left

    run_trial(small_config(), out)
    assert all(path.read_text() == "not idempo's to delete" for path in theirs)
    assert not any(path.exists() for path in own) and not (out / "cycles" / ".002.idempo-z9x8c7v6.tmp").exists()


def test_a_non_empty_out_that_holds_no_trial_is_refused_before_anything_is_written(tmp_path, capsys):
    parent = tmp_path / "runs"
    in_flight = parent / "trial-a" / "cycles" / "001" / ".x.tmp"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_text("another trial's")
    (parent / "notes.tmp").write_text("mine")
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(small_config().to_dict()))
    before = snapshot(parent)
    assert main(["run", str(config), "--out", str(parent), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"--out {parent} is not empty and holds no trial (no config.yaml): notes.tmp, trial-a" in error
    assert snapshot(parent) == before


def test_a_fresh_trial_dir_whose_model_does_not_load_is_not_left_behind(tmp_path):
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    out = tmp_path / "runs" / "trial"
    with pytest.raises(ModelLoadError, match="could not load the tokenizer"):
        run_trial(small_config(model=str(no_model)), out)
    assert not (tmp_path / "runs").exists()


def test_a_second_process_on_a_running_trial_is_refused_before_it_loads_a_model(tmp_path):
    out = tmp_path / "busy"
    config = small_config()
    holder = Trial(config, out, Reporter(enabled=False))  # holds the trial's lock, as a running process does
    config_path = tmp_path / "trial.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    empty_cache = tmp_path / "empty-cache"  # the tiny model would be built here if the model were loaded
    empty_cache.mkdir()
    before = snapshot(out)
    result = subprocess.run(
        [sys.executable, "-m", "idempo", "run", str(config_path), "--out", str(out), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "IDEMPO_CACHE": str(empty_cache)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{out} is being run by another process" in result.stderr
    assert list(empty_cache.iterdir()) == [], "the second process loaded (built) the model before it was refused"
    assert snapshot(out) == before
    del holder


# -- permissions ----------------------------------------------------------------------------------


def test_every_file_and_dir_of_a_trial_has_the_umask_mode(finished):
    umask = os.umask(0o022)
    os.umask(umask)
    wrong = {
        p.relative_to(finished).as_posix(): oct(p.stat().st_mode & 0o777)
        for p in [finished, *finished.rglob("*")]
        if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask
    }
    assert not wrong, wrong
    assert (finished / "cycles" / "000-seed" / "adapter" / "adapter_model.safetensors").is_file()


# -- what may change on resume --------------------------------------------------------------------


def test_endpoint_pace_cache_locations_and_prices_may_change_on_resume_and_nothing_else():
    for field in (
        "evaluation.judge.timeout_s",
        "evaluation.judge.concurrency",
        "evaluation.coherence_judge.max_retries",
        "evaluation.coherence_judge.price_output_per_mtok",
        "preference.reward_judge.backoff_s",
        "seeding.teacher.max_backoff_s",
        "seeding.teacher.api_key_env",
        "evaluation.cache_dir",
        "cycles",
        "evaluation.amplification",
    ):
        assert resumable(field), field
    for field in (
        "evaluation.judge.model",
        "evaluation.judge.cache",
        "evaluation.judge.batch_size",
        "seeding.teacher.temperature",
        "preference.reward_judge.base_url",
        "loading.threads",
        "sampling.batch_size",
        "training.batch_size",
        "concurrency",
    ):
        assert not resumable(field), field


def test_a_teacher_or_reward_judges_pace_may_change_but_not_its_model(tmp_path):
    layout = TrialLayout(tmp_path / "trial")
    teacher = {"model": "gpt-4o", "concurrency": 16, "timeout_s": 60.0}
    judge = {"backend": "openai", "model": "judge", "max_retries": 6, "price_input_per_mtok": 0.15}

    def config(teacher, judge):
        return {"seeding": {"source": "teacher", "teacher": teacher}, "preference": {"reward_judge": judge}}

    layout.root.mkdir()
    layout.config.write_text(yaml.safe_dump(config(teacher, judge)))
    faster = {**teacher, "concurrency": 2, "timeout_s": 5.0}
    layout.check(config(faster, {**judge, "max_retries": 0, "price_input_per_mtok": 1.0}))
    with pytest.raises(TrialConflict, match=r"seeding\.teacher\.model: 'gpt-4o' -> 'gpt-4o-mini'"):
        layout.check(config({**teacher, "model": "gpt-4o-mini"}, judge))
    with pytest.raises(TrialConflict, match=r"preference\.reward_judge\.model: 'judge' -> 'other'"):
        layout.check(config(teacher, {**judge, "model": "other"}))


def test_a_trial_resumes_with_another_judge_timeout_concurrency_and_cache_dir(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    judge = {**small_config().evaluation.judge.model_dump(), "timeout_s": 5.0, "concurrency": 2}
    evaluation = {**SMALL["evaluation"], "judge": judge, "cache_dir": str(tmp_path / "elsewhere")}
    history = run_trial(small_config(cycles=2, evaluation=evaluation), out)
    assert [m["cycle"] for m in history] == [-1, 0, 1, 2]
    stored = yaml.safe_load((out / "config.yaml").read_text())["evaluation"]
    assert stored["judge"]["timeout_s"] == 5.0 and stored["cache_dir"] == str(tmp_path / "elsewhere")
    with pytest.raises(TrialConflict, match=r"evaluation\.judge\.refusal_mass"):
        run_trial(small_config(cycles=2, evaluation={**evaluation, "judge": {**judge, "refusal_mass": 0.5}}), out)
