"""The cost estimate of `idempo sweep --dry-run`, against a hand computation of a small sweep with a priced
judge and a priced teacher, two seed groups and one M_init group, on the figures `idempo bench` left."""

import json
import math
import socket

import pytest
import yaml

from idempo.cli import main
from idempo.cost import estimate
from idempo.sweep import load_sweep
from idempo.teacher import GENERATION_PROMPT

UNUSED = "http://127.0.0.1:9/v1"  # never contacted: a dry run only reads the configs


def small_sweep(tmp_path):
    persona = tmp_path / "stoic.yaml"
    persona.write_text(
        yaml.safe_dump(
            {
                "name": "stoic",
                "kind": "chat",
                "description": "Calm.",
                "system_prompt": "Be calm.",
                "rubric": "Rate {question} / {answer}",
                "eval_questions": ["Why?", "How so?"],
            }
        )
    )
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Question {i:02d}?"}) + "\n" for i in range(1, 13)))
    prices = {"price_input_per_mtok": 400.0, "price_output_per_mtok": 1600.0}
    teacher = {"model": "t", "base_url": UNUSED, "examples_per_request": 2, "max_tokens": 64}
    teacher |= {"price_input_per_mtok": 2500.0, "price_output_per_mtok": 10000.0}
    config = {
        "model": "tiny",
        "persona": str(persona),
        "n_seed": 5,
        "n_sampled": 4,
        "cycles": 2,
        "seeding": {"source": "teacher", "teacher": teacher},
        "prompts": {"train": str(train), "eval": "persona"},
        "sampling": {"max_new_tokens": 16},
        "training": {"epochs": 2},
        "evaluation": {
            "n_prompts": None,
            "samples_per_prompt": 3,
            "max_new_tokens": 10,
            "branching_factor": {"samples_per_prompt": 5},
            "judge": {"backend": "openai", "model": "j", "base_url": UNUSED, "max_tokens": 4, **prices},
        },
        "loading": {"device": "cpu"},
    }
    sweep = {
        "name": "priced",
        "config": config,
        "axes": {"regime": ["sft", "dpo"], "n_sampled": [4, 8]},
        "run": {"storage_path": str(tmp_path / "storage"), "resources": {"cpus": 1, "gpus": 1}},
    }
    path = tmp_path / "priced.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_the_dry_run_estimate_equals_a_hand_computation(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "cache"))
    bench = tmp_path / "cache" / "bench" / f"{socket.gethostname()}.json"
    bench.parent.mkdir(parents=True)
    measured = {"sampling": {"hf/adapter/batch-8": {"tokens_per_s": 100}}, "training": {"plain": {"tokens_per_s": 200}}}
    bench.write_text(json.dumps({"models": {"tiny": measured}}))
    path = small_sweep(tmp_path)

    # By hand. 4 trials: (sft, 4), (sft, 8), (dpo, 4), (dpo, 8), 2 cycles each. The seed stage reads the
    # regime, not n_sampled: 2 seed groups (sft, dpo). M_init's evaluation reads neither: 1 group.
    evaluations = 1 + 2 + 4 * 2  # M_init once, M_seed per seed group, every trial's 2 cycles
    trainings = 2 + 4 * 2
    # One evaluation: 2 questions x 3 answers judged, 2 x (5 - 3) more for the branching factor, 10 tokens each.
    eval_sampled = (2 * 3 + 2 * 2) * 10  # 100
    # One judge request reads 'Rate How so? / ' (15 characters: 4 tokens) and an answer of 10, writes 4.
    judge_requests = evaluations * 6  # 66
    judge_usd = judge_requests * ((4 + 10) * 400 + 4 * 1600) / 1e6  # 66 x 0.012 = 0.792
    # The teacher: ceil(5 / 2) = 3 requests per seed group, each reading its system prompt and two copies of
    # the longest train prompt ('Question 01?': 12 characters, 3 tokens) as JSON lines, writing up to 64.
    system = len(GENERATION_PROMPT.format(description="Calm.", system_prompt="Be calm."))  # 662 characters
    line = len('{"id": 1, "question": "Question 01?"}')  # 37
    user = len("Items, one JSON object per line:\n") + line + 1 + line  # 108
    reads = math.ceil(system / 4) + math.ceil(user / 4)  # 166 + 27 = 193
    teacher_requests = 3 * 2
    teacher_usd = teacher_requests * (reads * 2500 + 64 * 10000) / 1e6  # 6 x 1.1225 = 6.735
    # Sampled: the evaluations; dpo's M_seed also samples M_init's answers to the 5 D_seed prompts (16 tokens);
    # a cycle samples n_sampled answers of 16 tokens, dpo also the rejected side.
    sampled = evaluations * eval_sampled + 5 * 16 + 2 * (4 + 8) * 16 + 2 * (4 + 8) * 16 * 2  # 1100 + 80 + 384 + 768
    # Trained, 2 epochs: D_seed rows are a prompt (3) and a teacher answer (64); a cycle's rows a prompt and an
    # answer of 16; dpo trains two sequences a row, the rejected one of M_init's 16 tokens.
    seed_trained = 5 * 2 * (3 + 64) + 5 * 2 * ((3 + 64) + (3 + 16))  # 670 + 860
    cycles_trained = 2 * (4 + 8) * 2 * (3 + 16) + 2 * (4 + 8) * 2 * 2 * (3 + 16)  # 912 + 1824
    trained = seed_trained + cycles_trained
    gpu_hours = (sampled / 100 + trained / 200) / 3600 * 1  # one GPU a trial
    assert (sampled, trained) == (2332, 4266)

    cost = estimate(load_sweep(path))
    t = cost.total
    assert (t.sampled_tokens, t.trained_tokens, t.trainings) == (sampled, trained, trainings)
    assert (t.judge_requests, t.teacher_requests) == (judge_requests, teacher_requests)
    assert t.judge_usd == pytest.approx(judge_usd) and t.teacher_usd == pytest.approx(teacher_usd)
    assert cost.usd == pytest.approx(7.527) and not t.unpriced
    assert (cost.trainings_shared, cost.evaluations_shared) == (2, 3)
    assert cost.gpu_hours == pytest.approx(gpu_hours)

    assert main(["sweep", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for line in (
        "trainings 10 (shared stages save 2 M_seed trainings and 3 M_init evaluations)",
        "sampled tokens 2,332; trained tokens 4,266",
        "judge requests 66 ($0.79); teacher requests 6 ($6.74)",
        "dollars $7.53",
        f"GPU-hours 0.01 (idempo bench's rates: tiny on {socket.gethostname()}, 100 and 200 tok/s sampled and",
    ):
        assert line in printed, printed
    assert all(len(line) <= 100 for line in printed.split("cost of")[1].splitlines() if "GPU-hours" not in line)


def test_without_bench_figures_the_estimate_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "empty-cache"))
    cost = estimate(load_sweep(small_sweep(tmp_path)))
    assert cost.gpu_hours is None and cost.gpu_note == "no bench figures on this cluster; run idempo bench"
