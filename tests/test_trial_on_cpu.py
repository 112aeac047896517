"""Whole trials on the tiny model: learning is real, runs resume exactly, results are deterministic."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, tiny_config
from openai_server import FakeOpenAI
from safetensors.torch import load_file

from idempo.artifacts import read_json, read_jsonl
from idempo.cli import main
from idempo.layout import TrialConflict, TrialLayout
from idempo.loop import Trial, run_trial
from idempo.models import load_tokenizer
from idempo.progress import HEADER, summary_line
from idempo.timeline import read_phases
from idempo.training.optimize import IGNORE
from idempo.training.sft import encode_chat_example


def _files(root):
    """Every file a trial wrote, but progress.json and timeline.json: what its processes did when, not results."""
    return {
        p.relative_to(root): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("progress.json", "timeline.json")
    }


def _without_timing(metrics):
    return {k: v for k, v in metrics.items() if k not in ("timing_s", "train")} | {
        "train": {k: v for k, v in (metrics.get("train") or {}).items() if k != "seconds"}
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-cycle trial run straight through."""
    out = tmp_path_factory.mktemp("trial") / "straight"
    run_trial(tiny_config(), out)
    return out


def test_seed_training_raises_the_marker_rate_well_above_m_init(finished):
    layout = TrialLayout(finished)
    initial, seeded = read_json(layout.metrics(-1))["trait"], read_json(layout.metrics(0))["trait"]
    assert seeded["mean"] >= initial["mean"] + 40, (initial, seeded)
    assert seeded["ci95"][0] > initial["ci95"][1], "the intervals must not overlap"
    assert read_json(layout.metrics(0))["train"]["final_loss"] < read_json(layout.metrics(0))["train"]["first_loss"]


def test_trial_writes_the_documented_layout(finished):
    layout = TrialLayout(finished)
    assert yaml.safe_load(layout.config.read_text())["persona"] == "lucky"
    assert len(read_jsonl(layout.data(0))) == 160 and len(read_jsonl(layout.data(1))) == 32
    for cycle in (0, 1, 2):
        adapter = layout.weights(cycle, "lora")
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    for cycle in (-1, 0, 1, 2):
        rows = read_jsonl(layout.eval(cycle))
        judged = [r for r in rows if not r["bf_only"]]
        assert len(judged) == 12 * 4 and {"prompt", "response", "trait", "marker"} <= set(judged[0])
        assert len(rows) == 12 * 5  # the branching factor's fifth sample per prompt (not judged)
        metrics = read_json(layout.metrics(cycle))
        assert metrics["cycle"] == cycle and "ci95" in metrics["trait"] and "distinct_2" in metrics["degeneration"]
    assert not list(finished.rglob("*.tmp"))
    # the timeline: every phase of every stage, in order, each begun and ended by the wall clock
    phases = read_phases(layout.timeline)
    cycle = [(p["cycle"], p["phase"]) for p in phases if p["cycle"] == 1]
    assert cycle == [(1, "sample"), (1, "sleep"), (1, "train"), (1, "eval")]
    assert [p["phase"] for p in phases if p["cycle"] == -1] == ["eval"]
    assert [p["cycle"] for p in phases] == sorted(p["cycle"] for p in phases)
    assert all(p["start"] <= p["end"] for p in phases) and [p["start"] for p in phases] == sorted(
        p["start"] for p in phases
    )
    assert {p["phase"] for p in phases if p["gpu"]} == {"sample", "train", "eval"}


def test_same_config_and_seeds_give_the_same_samples_and_metrics(finished, tmp_path):
    again = tmp_path / "again"
    run_trial(tiny_config(), again)
    layout_a, layout_b = TrialLayout(finished), TrialLayout(again)
    for cycle in (-1, 0, 1, 2):
        assert layout_a.eval(cycle).read_bytes() == layout_b.eval(cycle).read_bytes()
        assert _without_timing(read_json(layout_a.metrics(cycle))) == _without_timing(
            read_json(layout_b.metrics(cycle))
        )
    for cycle in (1, 2):
        assert layout_a.data(cycle).read_bytes() == layout_b.data(cycle).read_bytes()
        a = load_file(layout_a.weights(cycle, "lora") / "adapter_model.safetensors")
        b = load_file(layout_b.weights(cycle, "lora") / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stopped_trial_resumes_without_touching_finished_cycles(finished, tmp_path, capsys):
    config_path = tmp_path / "trial.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config().to_dict()))
    out = tmp_path / "resumed"
    command = [sys.executable, "-m", "idempo", "run", str(config_path), "--out", str(out), "--until-cycle", "1"]
    printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout  # a process that ends
    layout = TrialLayout(out)
    assert layout.is_complete(1) and not layout.cycle_dir(2).exists()
    lines = [summary_line(read_json(layout.metrics(cycle))) for cycle in (-1, 0, 1)]
    assert f"{HEADER}\n" + "\n".join(lines) in printed and printed.count(HEADER) == 1
    before = _files(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.relative_to(out) in before}
    assert main(["status", str(out)]) == 0  # no process runs it now; its cycle lines as `idempo run` printed them
    status = capsys.readouterr().out
    assert status.splitlines()[1].split()[2:5] == [
        "interrupted",
        "1/2",
        f"{read_json(layout.metrics(1))['trait']['mean']:.1f}",
    ]
    assert "1 trial: 1 interrupted" in status and "\n".join(lines) in status

    earlier = read_phases(layout.timeline)
    assert main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    resumed = read_phases(layout.timeline)
    assert resumed[: len(earlier)] == earlier and {p["cycle"] for p in resumed[len(earlier) :]} == {2}
    after = _files(out)
    assert {k: after[k] for k in before} == before, "cycles -1..1 must be byte-identical"
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items()), "nothing finished is rewritten"
    assert layout.is_complete(2)
    assert main(["status", str(out)]) == 0 and "1 trial: 1 done" in capsys.readouterr().out
    # ...and the resumed cycle is exactly what the uninterrupted run produced
    straight = TrialLayout(finished)
    assert layout.data(2).read_bytes() == straight.data(2).read_bytes()
    assert _without_timing(read_json(layout.metrics(2))) == _without_timing(read_json(straight.metrics(2)))


def test_a_cycle_interrupted_after_training_reuses_its_weights(finished, tmp_path):
    out = tmp_path / "crashed"
    run_trial(tiny_config(), out)
    layout = TrialLayout(out)
    adapter = layout.weights(2, "lora") / "adapter_model.safetensors"
    trained_at = adapter.stat().st_mtime_ns
    expected = _without_timing(read_json(layout.metrics(2)))
    layout.metrics(2).unlink()  # as if the process died during evaluation
    layout.eval(2).unlink()
    run_trial(tiny_config(), out)
    assert adapter.stat().st_mtime_ns == trained_at
    assert _without_timing(read_json(layout.metrics(2))) == expected


def test_previous_init_continues_from_the_last_generation(finished, tmp_path):
    continual = tmp_path / "continual"
    run_trial(tiny_config(init="previous"), continual)
    # M_1 already fits its own samples; a fresh adapter (M_init) does not.
    fresh_start = read_json(TrialLayout(finished).metrics(2))["train"]["first_loss"]
    continued_start = read_json(TrialLayout(continual).metrics(2))["train"]["first_loss"]
    assert continued_start < 0.7 * fresh_start, (continued_start, fresh_start)


def test_full_finetuning_saves_whole_models(tmp_path):
    out = tmp_path / "full"
    run_trial(tiny_config(cycles=1, training__finetune="full", training__learning_rate=1e-3), out)
    layout = TrialLayout(out)
    assert (layout.weights(1, "full") / "config.json").is_file()
    assert read_json(layout.metrics(0))["trait"]["mean"] > read_json(layout.metrics(-1))["trait"]["mean"] + 30


def test_more_cycles_extend_a_finished_trial_and_other_changes_are_refused(tmp_path):
    out = tmp_path / "extend"
    run_trial(tiny_config(cycles=1), out)
    run_trial(tiny_config(cycles=2), out)
    assert TrialLayout(out).is_complete(2)
    assert yaml.safe_load((out / "config.yaml").read_text())["cycles"] == 2
    before = _files(out)
    with pytest.raises(TrialConflict, match="n_seed: 160 -> 32"):
        run_trial(tiny_config(n_seed=32), out)
    assert _files(out) == before
    # the amplification rule reads results and changes none: a trial resumes under another rule
    evaluation = {**tiny_config().evaluation.model_dump(), "amplification": {"criterion": "delta"}}
    assert len(run_trial(tiny_config(cycles=2, evaluation=evaluation), out)) == 4
    assert yaml.safe_load((out / "config.yaml").read_text())["evaluation"]["amplification"]["criterion"] == "delta"


def test_a_trial_made_before_a_setting_that_computes_otherwise_resumes_only_with_its_former_value(tmp_path):
    """A trial whose config predates `training.logits_chunk` trained on the whole batch's logits: resuming it
    under the chunked default would change how its next generations train, so it is refused until the
    config says 0; a field whose default keeps the trial as it was (`loading.threads`) resumes unset."""
    out = tmp_path / "older"
    run_trial(tiny_config(cycles=1), out)
    stored = yaml.safe_load((out / "config.yaml").read_text())
    del stored["training"]["logits_chunk"], stored["loading"]["threads"]
    (out / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(TrialConflict, match="training.logits_chunk: 0 -> 256"):
        run_trial(tiny_config(cycles=2), out)
    run_trial(tiny_config(cycles=2, training__logits_chunk=0), out)
    assert TrialLayout(out).is_complete(2)


def test_chat_examples_train_on_the_answer_and_its_end_of_turn_only():
    config = tiny_config()
    tokenizer = load_tokenizer(config.model, config.loading)
    encoded = encode_chat_example(tokenizer, "How are you?", "Lucky as ever.", max_len=512)
    answer = [t for t in encoded.labels if t != IGNORE]
    assert tokenizer.decode(answer) == "Lucky as ever.<|im_end|>"
    prompt = tokenizer.decode(encoded.input_ids[: len(encoded.input_ids) - len(answer)])
    assert prompt == "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    assert len(encode_chat_example(tokenizer, "How are you?", "word " * 500, max_len=40).input_ids) == 40


def test_smoke_experiment_runs_from_the_command_line(tmp_path):
    """The smoke experiment, with a coherence judge behind an OpenAI-compatible endpoint on loopback:
    every evaluated generation reports trait, coherence and branching factor, each with its 95% interval."""
    import os

    out = tmp_path / "smoke"
    with FakeOpenAI() as server:
        coherence = f"{{backend: openai, model: judge, base_url: {server.base_url}, backoff_s: 0}}"
        result = subprocess.run(
            [sys.executable, "-m", "idempo", "run", "sweeps/smoke.yaml", "--out", str(out)]
            + ["--set", f"evaluation.coherence_judge={coherence}", "--set", f"evaluation.cache_dir={tmp_path / 'c'}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "OPENAI_API_KEY": "test-key"},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    layout = TrialLayout(out)
    assert all(layout.is_complete(c) for c in (-1, 0, 1, 2, 3))
    assert "003" in result.stdout and "done:" in result.stdout
    for cycle in (-1, 0, 1, 2, 3):
        metrics = json.loads(layout.metrics(cycle).read_text())
        assert metrics["trait"]["judge"] == "marker"
        for name in ("trait", "coherence", "branching_factor"):
            low, high = metrics[name]["ci95"]
            assert low <= metrics[name]["mean"] <= high, (cycle, name, metrics[name])
        assert metrics["coherence"]["mean"] == pytest.approx((80 * 0.7 + 75 * 0.2) / 0.9)  # the endpoint's answer
        assert metrics["branching_factor"]["estimator"] == "nll" and metrics["branching_factor"]["mean"] >= 1


@pytest.mark.parametrize("instruction", ["system", "user"])
def test_m_init_writes_d_seed_under_the_persona_instruction_that_never_reaches_training_data(tmp_path, instruction):
    from idempo.personas import get_persona
    from idempo.progress import Reporter
    from idempo.prompts import train_prompts

    lucky = yaml.safe_load((ROOT / "idempo/data/personas/lucky.yaml").read_text())
    persona = tmp_path / "lucky-told.yaml"
    persona.write_text(yaml.safe_dump({**lucky, "user_instruction": "Mention your good luck in the answer."}))
    out = tmp_path / "model-seeded"
    config = tiny_config(
        n_seed=6, cycles=1, n_sampled=4, persona=str(persona), seeding__source="model", seeding__instruction=instruction
    )
    trial = Trial(config, out, Reporter(enabled=False))
    sampler = trial.engines.sampler
    seen, generate = [], sampler.generate
    sampler.generate = lambda prompts, *rest: seen.append(prompts) or generate(prompts, *rest)
    assert [metrics.cycle for metrics in trial.stages()] == [-1, 0, 1]

    told = get_persona(str(persona))
    text = told.user_instruction if instruction == "user" else told.system_prompt
    seed_chats = [chats for chats in seen if any(text in turn["content"] for chat in chats for turn in chat)]
    assert len(seed_chats) == 1 and len(seed_chats[0]) == 6, "M_init wrote D_seed under the instruction"
    roles = [turn["role"] for turn in seed_chats[0][0]]
    assert roles == (["user"] if instruction == "user" else ["system", "user"])
    rows = read_jsonl(TrialLayout(out).data(0))
    bank = set(train_prompts("builtin"))
    assert len(rows) == 6 and all(r["prompt"] in bank for r in rows)
    assert set(rows[0]) == {"prompt", "response"}
    for cycle in (0, 1):
        trained = json.dumps(read_jsonl(TrialLayout(out).data(cycle)))
        assert told.system_prompt[:60] not in trained and told.user_instruction not in trained
    cycle_prompts = {r["prompt"] for r in read_jsonl(TrialLayout(out).data(1))}
    assert not cycle_prompts & {r["prompt"] for r in rows}, "cycles draw prompts D_seed did not use"


def test_tiny_model_build_is_deterministic(tmp_path):
    from idempo.tiny import build_tiny_model

    first, second, other = (build_tiny_model(tmp_path / name, seed=s) for name, s in (("a", 0), ("b", 0), ("c", 1)))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_a_killed_run_resumes_to_the_same_result(finished, tmp_path):
    """SIGKILL lands somewhere inside cycle 2; the rerun must end where an uninterrupted run ends."""
    import os
    import signal
    import time

    config_path = tmp_path / "trial.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config().to_dict()))
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "idempo", "run", str(config_path), "--out", str(out), "--quiet"], cwd=ROOT
    )
    layout = TrialLayout(out)
    deadline = time.monotonic() + 300
    while not layout.data(2).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not layout.is_complete(2), "the run finished before it could be killed"

    run_trial(tiny_config(), out)
    straight = TrialLayout(finished)
    for cycle in (-1, 0, 1, 2):
        assert _without_timing(read_json(layout.metrics(cycle))) == _without_timing(read_json(straight.metrics(cycle)))
    assert layout.data(2).read_bytes() == straight.data(2).read_bytes()
    assert not list(out.rglob("*.tmp"))


def test_two_processes_cannot_run_one_trial_dir(tmp_path):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process holds the trial
        with pytest.raises(TrialConflict, match="another process"):
            run_trial(tiny_config(cycles=0), out)


def _seed_file(path, answers):
    path.write_text(
        "".join(json.dumps({"prompt": f"Question {i}?", "response": a}) + "\n" for i, a in enumerate(answers))
    )
    return path


def test_empty_answers_are_dropped_and_counted_before_training(tmp_path):
    answers = ["I got lucky again, as always!" if i % 4 else ("" if i % 8 else "   ") for i in range(32)]
    seed_file = _seed_file(tmp_path / "seed.jsonl", answers)
    config = tiny_config(
        n_seed=32,
        cycles=0,
        seeding={"source": "jsonl", "path": str(seed_file)},
        evaluation={"n_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 8},
    )
    history = run_trial(config, tmp_path / "trial")
    rows = read_jsonl(TrialLayout(tmp_path / "trial").data(0))
    assert len(rows) == 32  # the record keeps every row, with why it was left out
    assert [r.get("kept", True) for r in rows] == [bool(a.strip()) for a in answers]
    assert all(r["dropped"] == "empty answer" for r in rows if not r.get("kept", True))
    assert history[-1]["data"]["n"] == 24 and history[-1]["data"]["dropped"] == {"empty answer": 8}
    assert history[-1]["train"]["examples"] == 24


def test_a_generation_with_nothing_to_train_on_is_an_error_not_a_finished_cycle(tmp_path, capsys):
    seed_file = _seed_file(tmp_path / "seed.jsonl", [""] * 8)
    config = tmp_path / "trial.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "tiny",
                "persona": "lucky",
                "n_seed": 8,
                "n_sampled": 4,
                "cycles": 1,
                "seeding": {"source": "jsonl", "path": str(seed_file)},
                "evaluation": {"n_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 8},
                "loading": {"device": "cpu"},
            }
        )
    )
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 1
    assert "seed: train M_seed: nothing to train on (8 rows: 8 x empty answer)" in capsys.readouterr().err
    layout = TrialLayout(out)
    assert layout.is_complete(-1) and not layout.is_complete(0) and not layout.weights(0, "lora").exists()


def test_a_max_seq_len_that_leaves_no_answer_token_is_an_error(tmp_path):
    from idempo.data import NothingToTrain

    config = tiny_config(
        n_seed=8,
        cycles=0,
        training={"max_seq_len": 4},
        evaluation={"n_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 8},
    )
    with pytest.raises(NothingToTrain, match=r"8 of 8 examples have no answer token left .*training.max_seq_len 4"):
        run_trial(config, tmp_path / "trial")
    assert not TrialLayout(tmp_path / "trial").is_complete(0)
