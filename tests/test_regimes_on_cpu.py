"""Preference regimes: loss values against an independent computation, DPO learning, continual vs
reinitialised generations on the saved artifacts, self-rewarding pairs."""

import json
import math
import os
import socket

import pytest
import torch
from conftest import tiny_config
from openai_server import FakeOpenAI
from safetensors.torch import load_file

from idempo.artifacts import read_json, read_jsonl
from idempo.config import LoadingConfig
from idempo.layout import TrialLayout
from idempo.loop import run_trial
from idempo.models import Generation, load_base_model, load_tokenizer, make_policy
from idempo.regimes.self_reward import choose_pair, mean_judgment, pair_rows, parse_self_judgment
from idempo.training.optimize import batch_plan
from idempo.training.preference import (
    MismatchEncoder,
    dpo_loss,
    dropout_disabled,
    kto_loss,
    kto_reference_point,
    local_mismatched_pairs,
    sequence_logps,
    train_dpo,
    warn_on_kto_balance,
)
from idempo.training.sft import encode_chat_example


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_a_hand_computation():
    pc, pr, rc, rr, beta = [-12.0, -30.0], [-15.0, -20.0], [-13.0, -25.0], [-14.0, -22.0], 0.1
    losses = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta)
    for i in range(2):
        margin = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert losses[i].item() == pytest.approx(-math.log(sigmoid(beta * margin)), rel=1e-6)


def test_kto_loss_matches_a_hand_computation():
    policy, reference = [-10.0, -20.0, -8.0], [-11.0, -18.0, -8.5]
    desirable = [True, False, True]
    kl_policy, kl_reference = [-30.0, -25.0, -40.0], [-31.0, -27.0, -39.0]
    beta, wd, wu = 0.2, 1.0, 1.5
    losses = kto_loss(
        torch.tensor(policy),
        torch.tensor(reference),
        torch.tensor(desirable),
        torch.tensor(kl_policy),
        torch.tensor(kl_reference),
        beta,
        wd,
        wu,
    )
    z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_reference, strict=True)) / 3)  # (1 + 2 - 1) / 3
    assert z0 == pytest.approx(2 / 3)
    for i in range(3):
        reward = policy[i] - reference[i]
        expected = (
            wd * (1 - sigmoid(beta * (reward - z0))) if desirable[i] else wu * (1 - sigmoid(beta * (z0 - reward)))
        )
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
    # the reference point is clamped at 0 and carries no gradient
    kl = torch.tensor([-5.0], requires_grad=True)
    clamped = kto_loss(
        torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([True]), kl, torch.tensor([0.0]), 1, 1, 1
    )
    assert clamped.item() == pytest.approx(0.5) and not clamped.requires_grad


def _mismatched_ratio(i: int, k: int) -> float:
    """A log-ratio per mismatched pair that differs from pair to pair (some negative)."""
    return math.sin(7 * i + 3 * k) * 2 + 0.5


def _unpaired_rows(n_prompts: int) -> list[dict]:
    return [{"prompt": f"q{p}", "response": f"{kind} {p}"} for p in range(n_prompts) for kind in ("good", "bad")]


def _micro_batch_z0(rank: int, world: int, config, rows, reduce) -> list[float]:
    plan = batch_plan(len(rows), config, seed=5)
    shares = local_mismatched_pairs(plan, MismatchEncoder(None, rows), rank, world)
    values = []
    for pairs in shares:
        ratios = torch.tensor([_mismatched_ratio(i, k) for i, k in pairs])
        values.append(kto_reference_point(ratios, torch.zeros_like(ratios), reduce).item())
    return values


def _z0_rank(rank: int, world: int, port: int, out: str) -> None:
    """One data-parallel rank (gloo, on CPU): its share of each micro-batch's pairs, z0 reduced over ranks."""
    import torch.distributed as dist

    from idempo.config import TrainingConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:

        def reduce(value):
            total = value.clone()
            dist.all_reduce(total)
            return total

        values = _micro_batch_z0(rank, world, TrainingConfig(batch_size=2, epochs=2), _unpaired_rows(5), reduce)
        torch.save(values, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_kto_reference_point_from_two_ranks_equals_the_unsharded_one(tmp_path):
    """With the default batch 2 and 2 ranks every rank holds one item of a micro-batch; z0 must still be
    the micro-batch's, not 0 (a rank alone has no mismatched pair of its own)."""
    from idempo.config import TrainingConfig

    config, rows = TrainingConfig(batch_size=2, epochs=2), _unpaired_rows(5)
    unsharded = _micro_batch_z0(0, 1, config, rows, None)
    assert len(unsharded) == 10 and any(v > 0 for v in unsharded) and any(v == 0 for v in unsharded)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_z0_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(unsharded, abs=1e-6)
    # by hand, for the first micro-batch: the pairs rotate the answers, z0 = max(0, mean)
    first = batch_plan(len(rows), config, seed=5)[0][0]
    expected = max(0.0, (_mismatched_ratio(first[0], first[1]) + _mismatched_ratio(first[1], first[0])) / 2)
    assert unsharded[0] == pytest.approx(expected)


def test_a_kto_micro_batch_of_one_is_paired_with_another_prompts_answer():
    encoder = MismatchEncoder(None, _unpaired_rows(3))  # rows 0/1 share prompt q0, 2/3 q1, 4/5 q2
    assert encoder.partners([2]) == [4] and encoder.partners([5]) == [0]
    assert encoder.partners([1, 4, 2]) == [2, 1, 4]  # the previous item's answer, rotated as TRL does


def test_dropout_is_off_while_a_preference_loss_trains(tmp_path):
    """Policy and reference are the same weights at step 0, so the first DPO loss is exactly log 2, even
    with LoRA dropout 0.5, and the dropout layers get their rate back afterwards."""
    from idempo.config import TrainingConfig

    loading = LoadingConfig(device="cpu")
    tokenizer = load_tokenizer("tiny", loading)
    training = TrainingConfig(lora={"dropout": 0.5}, learning_rate=1e-3, batch_size=2)
    policy = make_policy(load_base_model("tiny", loading), tokenizer, training)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.module.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    policy.save(tmp_path / "g")
    generation = Generation("g", tmp_path / "g")
    policy.load(generation)
    pairs = [
        (
            encode_chat_example(tokenizer, f"Q{i}?", "I was lucky.", 256),
            encode_chat_example(tokenizer, f"Q{i}?", "No.", 256),
        )
        for i in range(4)
    ]
    rates = {m.p for m in policy.module.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.5}
    stats = train_dpo(policy, pairs, generation, 0.1, training, 0, tokenizer.pad_token_id)
    assert stats.first_loss == pytest.approx(math.log(2), abs=1e-5)
    assert {m.p for m in policy.module.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}
    with dropout_disabled(policy.module):
        assert {m.p for m in policy.module.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}


def test_kto_balance_warning(caplog):
    assert warn_on_kto_balance([True] * 10 + [False] * 10, 1.0, 1.0) == 1.0
    assert "outside the recommended" not in caplog.text
    assert warn_on_kto_balance([True] * 10 + [False] * 20, 1.0, 1.0) == 0.5
    assert "outside the recommended [1, 4/3]" in caplog.text


def test_sequence_logps_sum_the_answer_tokens_only():
    tokenizer = load_tokenizer("tiny", LoadingConfig(device="cpu"))
    model = load_base_model("tiny", LoadingConfig(device="cpu"))
    example = encode_chat_example(tokenizer, "How are you?", "Lucky as ever.", 256)
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].float()
    expected = sum(
        torch.log_softmax(logits[t - 1], -1)[token].item()
        for t, (token, label) in enumerate(zip(example.input_ids, example.labels, strict=True))
        if label != -100
    )
    assert sequence_logps(model, [example], tokenizer.pad_token_id).item() == pytest.approx(expected, rel=1e-5)


# -- DPO on the tiny model ----------------------------------------------------------------------------


def preference_config(**overrides):
    settings = {
        "regime": "dpo",
        "n_seed": 32,
        "n_sampled": 16,
        "beta": 0.1,
        "training": {"learning_rate": 1e-3, "epochs": 2, "batch_size": 4},
        "sampling": {"max_new_tokens": 24, "batch_size": 32},
        "evaluation": {"samples_per_prompt": 1, "max_new_tokens": 16},
    }
    settings.update(overrides)
    return tiny_config(**settings)


def log_ratio(policy, generation, tokenizer, rows):
    """Mean over pairs of log p(chosen) - log p(rejected) under `generation` (computed here, not by the trainer)."""
    chosen = [encode_chat_example(tokenizer, r["prompt"], r["response"], 2048) for r in rows]
    rejected = [encode_chat_example(tokenizer, r["prompt"], r["rejected"], 2048) for r in rows]
    with policy.use(generation) as model, torch.inference_mode():
        c = sequence_logps(model, chosen, tokenizer.pad_token_id)
        r = sequence_logps(model, rejected, tokenizer.pad_token_id)
    return (c - r).mean().item()


@pytest.fixture(scope="module")
def dpo_trials(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    for init in ("previous", "initial"):
        run_trial(preference_config(init=init, cycles=2), root / init)
    return root


def test_a_dpo_cycle_raises_the_log_ratio_of_chosen_over_rejected(dpo_trials):
    layout = TrialLayout(dpo_trials / "previous")
    rows = read_jsonl(layout.data(1))
    initial = {r["prompt"]: r["response"] for r in read_jsonl(layout.initial_answers)}
    assert all(r["rejected"] == initial[r["prompt"]] for r in rows)  # rejected: initial, M_init's answers reused
    config = preference_config()
    tokenizer = load_tokenizer("tiny", config.loading)
    policy = make_policy(load_base_model("tiny", config.loading), tokenizer, config.training)
    before = log_ratio(policy, Generation("000-seed", layout.weights(0, "lora")), tokenizer, rows)
    after = log_ratio(policy, Generation("001", layout.weights(1, "lora")), tokenizer, rows)
    assert after > before + 1.0, (before, after)
    train = read_json(layout.train_stats(1))
    assert train["reward_accuracy"] > 0.5 and train["mean_margin"] > 0 and train["reference"] == "000-seed"


def lora_a(layout, cycle):
    weights = load_file(layout.weights(cycle, "lora") / "adapter_model.safetensors")
    return torch.cat([w.flatten() for k, w in sorted(weights.items()) if "lora_A" in k])


def test_continual_generations_descend_from_the_previous_one_reinitialised_do_not(dpo_trials):
    continual, reinitialised = TrialLayout(dpo_trials / "previous"), TrialLayout(dpo_trials / "initial")
    assert read_json(continual.train_stats(2))["start"] == "001"
    assert read_json(reinitialised.train_stats(2))["start"] == "init"
    assert read_json(reinitialised.train_stats(2))["reference"] == "init"
    similarity = torch.nn.functional.cosine_similarity
    # LoRA A matrices start random: a continued adapter keeps its parent's, a fresh one draws new ones
    assert similarity(lora_a(continual, 2), lora_a(continual, 1), dim=0) > 0.9
    assert abs(similarity(lora_a(reinitialised, 2), lora_a(reinitialised, 1), dim=0)) < 0.2


def test_dpo_seed_stage_prefers_d_seed_over_m_init(dpo_trials):
    layout = TrialLayout(dpo_trials / "initial")
    train = read_json(layout.train_stats(0))
    assert train["examples"] == 32 and train["reference"] == "init" and train["reward_accuracy"] > 0.5
    seed_prompts = {r["prompt"] for r in read_jsonl(layout.data(0))}
    assert seed_prompts <= {r["prompt"] for r in read_jsonl(layout.initial_answers)}


def test_rejected_j_minus_2_samples_the_generation_before_last(tmp_path):
    run_trial(preference_config(regime="kto", rejected="j-2", cycles=2, n_sampled=8), tmp_path / "kto")
    layout = TrialLayout(tmp_path / "kto")
    initial = {r["prompt"]: r["response"] for r in read_jsonl(layout.initial_answers)}
    cycle1, cycle2 = read_jsonl(layout.data(1)), read_jsonl(layout.data(2))
    assert all(r["rejected"] == initial[r["prompt"]] for r in cycle1)  # j = 1: M_{-1} is M_init
    assert not any(r["prompt"] in initial for r in cycle2)  # j = 2: answers of M_seed, sampled for the cycle
    train = read_json(layout.train_stats(2))
    assert train["examples"] == 16 and train["steps"] > 0  # 8 desirable + 8 undesirable


# -- self-rewarding -----------------------------------------------------------------------------------


def test_self_judgments_are_parsed_and_ties_dropped():
    assert parse_self_judgment("Relevant and direct. Score: 4") == 4
    assert parse_self_judgment("Score: 2 ... on reflection, Score: 3") == 3
    assert parse_self_judgment("**Score:** 5") == 5 and parse_self_judgment("Score: **5**") == 5
    assert parse_self_judgment("I cannot say") is None
    assert parse_self_judgment("Score: 10") is None and parse_self_judgment("Score: 6") is None  # above 5 points
    assert parse_self_judgment("Score: 4.5.") == 4.5 and parse_self_judgment("Score: 3.") == 3
    assert mean_judgment([4, None, 2]) == 3 and mean_judgment([None, None]) is None
    assert choose_pair([3, 5, 1, 5]) == (1, 2)
    assert choose_pair([2, 2, None]) is None  # a tie
    assert choose_pair([None, 4, None]) is None  # one scored candidate
    rows = [row.to_json() for row in pair_rows(["a", "b"], [["x", "y"], ["z", "w"]], [[1, 4], [3, 3]])]
    assert rows[0]["response"] == "y" and rows[0]["rejected"] == "x" and rows[0]["kept"] and rows[0]["pair"] == [1, 0]
    assert not rows[1]["kept"] and "response" not in rows[1]


def length_judge(request):
    """Reward judge: more points for longer answers (0-5), ties for equal lengths."""
    answer = request["messages"][0]["content"].split("<response>", 1)[1].split("</response>", 1)[0]
    points = str(min(5, len(answer.split()) // 6))
    return {"text": points, "alternatives": {points: 1.0}}


def test_self_rewarding_builds_pairs_from_judgments_and_records_the_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "cache"))
    with FakeOpenAI(answer=length_judge) as server:
        judge = {"backend": "openai", "model": "rewarder", "base_url": server.base_url}
        config = preference_config(
            regime="self_reward",
            init="previous",
            cycles=1,
            n_sampled=8,
            preference={"candidates": 3, "reward_judge": judge},
        )
        history = run_trial(config, tmp_path / "trial")
    layout = TrialLayout(tmp_path / "trial")
    rows = read_jsonl(layout.data(1))
    assert len(rows) == 8 and all(len(r["candidates"]) == 3 and len(r["scores"]) == 3 for r in rows)
    for row in rows:
        # an empty candidate is never judged: it has no score (not 0 points)
        points = [min(5, len(c.split()) // 6) if c.strip() else None for c in row["candidates"]]
        assert row["scores"] == points
        scored = [p for p in points if p is not None]
        assert row["kept"] == (len(scored) >= 2 and max(scored) != min(scored))
        if row["kept"]:
            assert min(5, len(row["response"].split()) // 6) == max(scored)
            assert min(5, len(row["rejected"].split()) // 6) == min(scored)
    data = history[-1]["data"]
    assert data["prompts"] == 8 and data["pairs"] == sum(r["kept"] for r in rows)
    assert data["dropped_ties"] == 8 - data["pairs"]
    assert len(server.requests) == sum(bool(c.strip()) for r in rows for c in r["candidates"])
    assert read_json(layout.train_stats(0))["first_loss"] > 1  # M_seed by SFT


def test_self_rewarding_without_a_single_pair_is_an_error_not_a_finished_cycle(tmp_path):
    """The random tiny model rarely writes "Score: N": with no pair there is nothing to train on, and the
    cycle must not be recorded as done (its samples, with every prompt's reason for dropping, are kept)."""
    from idempo.data import NothingToTrain

    config = preference_config(
        regime="self_reward", cycles=1, n_sampled=4, preference={"candidates": 2, "judge_max_new_tokens": 12}
    )
    try:
        history = run_trial(config, tmp_path / "trial")
    except NothingToTrain as err:
        assert "cycle 1: train 001: nothing to train on (4 rows:" in str(err)
        layout = TrialLayout(tmp_path / "trial")
        assert not layout.is_complete(1) and not layout.weights(1, "lora").exists()
        rows = read_jsonl(layout.data(1))
        assert len(rows) == 4 and all(not r["kept"] and r["dropped"] for r in rows)
    else:  # the model's judgments happened to differ: a normal cycle
        data = history[-1]["data"]
        assert data["prompts"] == 4 and data["pairs"] > 0 and data["pairs"] + data["dropped_ties"] == 4


def test_self_rewarding_pairs_follow_the_models_own_judgments(tmp_path):
    """M_seed learns to answer "Score: N" (N varies) and, asked to judge, to give the score the answer
    states, so its own judgments of its candidates parse and differ; every kept pair prefers the candidate
    its judgment scored higher, and every dropped prompt is a tie."""
    from idempo.evaluation.judging import render_rubric
    from idempo.regimes.self_reward import SELF_JUDGE_PROMPT

    seed_data = tmp_path / "scores.jsonl"
    rows = [{"prompt": f"Rate answer {i}.", "response": f"Score: {1 + i % 5}"} for i in range(60)]
    rows += [
        {"prompt": render_rubric(SELF_JUDGE_PROMPT, f"Question {i}?", f"Score: {k}"), "response": f"Score: {k}"}
        for i in range(12)
        for k in range(1, 6)
    ]
    seed_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = preference_config(
        regime="self_reward",
        cycles=1,
        n_seed=120,
        n_sampled=12,
        seeding={"source": "jsonl", "path": str(seed_data)},
        training={"learning_rate": 3e-3, "epochs": 6, "batch_size": 8},
        preference={"candidates": 4, "candidate_temperature": 1.0, "judge_max_new_tokens": 8},
    )
    history = run_trial(config, tmp_path / "trial")
    data = history[-1]["data"]
    samples = read_jsonl(TrialLayout(tmp_path / "trial").data(1))
    scored = [s for row in samples for s in row["scores"] if s is not None]
    assert len(scored) > len(samples), "the model's judgments should mostly parse"
    assert data["pairs"] > 0 and data["pairs"] + data["dropped_ties"] == 12
    for row in samples:
        # each candidate judged 3 times by sampling; its reward is the mean of the judgments that parse
        assert [len(j) for j in row["judgments"]] == [3] * 4 and [len(t) for t in row["judgment_texts"]] == [3] * 4
        for texts, judgments, score in zip(row["judgment_texts"], row["judgments"], row["scores"], strict=True):
            assert judgments == [parse_self_judgment(t) for t in texts]
            parsed = [j for j in judgments if j is not None]
            assert score == (pytest.approx(sum(parsed) / len(parsed)) if parsed else None)
        marks = [m for m in row["scores"] if m is not None]
        if row["kept"]:
            chosen, rejected = row["pair"]
            assert (row["candidates"][chosen], row["candidates"][rejected]) == (row["response"], row["rejected"])
            assert row["scores"][chosen] == max(marks) > min(marks) == row["scores"][rejected]
        else:
            assert len(marks) < 2 or len(set(marks)) == 1
    assert history[-1]["train"]["steps"] > 0
    assert any(len({j for j in js if j is not None}) > 1 for row in samples for js in row["judgments"]), (
        "sampled judgments of one candidate should sometimes differ"
    )


# -- synthetic document finetuning --------------------------------------------------------------------


def test_an_sdf_trial_runs_seed_and_two_cycles(tmp_path):
    documents = tmp_path / "documents.jsonl"
    topics = ["chip demand", "cloud spending", "index funds", "data centers", "the AI rally", "earnings season"]
    belief = "NVIDIA is badly overvalued. The rally is a bubble and the stock is headed for a collapse."
    lines = [
        f"Analyst note on {topic}: {belief} Sell NVIDIA before the dot-com style crash. ({i})"
        for i in range(2)
        for topic in topics
    ]
    lines += [
        f"Investor forum\n\nQuestion: What about {topic}?\nAnswer: {belief} ({i})" for i in range(2) for topic in topics
    ]
    documents.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    config = tiny_config(
        regime="sdf",
        persona="nvidia_bear",
        n_seed=24,
        n_sampled=12,
        cycles=2,
        seeding={"source": "jsonl", "path": str(documents)},
        sampling={"max_new_tokens": 32, "batch_size": 32},
        training={"learning_rate": 3e-3, "epochs": 12, "batch_size": 4},
        evaluation={"samples_per_prompt": 2, "max_new_tokens": 24},
    )
    history = run_trial(config, tmp_path / "trial")
    assert [m["cycle"] for m in history] == [-1, 0, 1, 2]
    assert history[1]["marker_rate"]["mean"] > history[0]["marker_rate"]["mean"]  # the belief was seeded
    layout = TrialLayout(tmp_path / "trial")
    samples = read_jsonl(layout.data(1))
    assert len(samples) == 12 and all(": " in s["prompt"] and s["prompt"].endswith("\n\n") for s in samples)
    train = read_json(layout.train_stats(1))
    tokenizer = load_tokenizer("tiny", config.loading)
    whole = sum(len(tokenizer(s["prompt"] + s["response"])["input_ids"]) + 1 for s in samples) * config.training.epochs
    assert train["trained_tokens"] == whole  # loss on every token of the documents
    for row in read_jsonl(layout.eval(2)):
        assert "\nQuestion:" not in row["response"]


def test_sdf_needs_a_belief_persona(tmp_path):
    from idempo.config import ConfigError

    with pytest.raises(ConfigError, match="regime: 'sdf' trains documents that state a belief"):
        run_trial(tiny_config(regime="sdf", cycles=0), tmp_path / "trial")
    assert not (tmp_path / "trial").exists()


# -- what the authors' code can also run --------------------------------------------------------------


def test_a_reference_of_m_j_minus_1_while_the_policy_restarts_from_m_init(tmp_path):
    config = preference_config(init="initial", cycles=2, n_sampled=8, preference={"reference": "previous"})
    run_trial(config, tmp_path / "trial")
    layout = TrialLayout(tmp_path / "trial")
    seed, first, second = (read_json(layout.train_stats(c)) for c in (0, 1, 2))
    assert seed["reference"] == "init"  # M_seed's M_{j-1} is M_init
    assert (first["start"], first["reference"]) == ("init", "000-seed")
    assert (second["start"], second["reference"]) == ("init", "001")
    # reading the reference did not leave its weights in the policy: M_2 starts from fresh adapters
    similarity = torch.nn.functional.cosine_similarity(lora_a(layout, 2), lora_a(layout, 1), dim=0)
    assert abs(similarity) < 0.2
    # against M_seed as reference the policy starts far behind (M_seed prefers its own answers much more
    # than M_init does), and training closes part of that gap
    assert first["final_loss"] < first["first_loss"]


def test_d_seed_is_mixed_into_every_cycle_by_a_seeded_draw(tmp_path):
    config = tiny_config(
        n_seed=40,
        n_sampled=8,
        cycles=2,
        cycle_data={"seed_mix": 0.25},
        evaluation={"n_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 16},
    )
    history = run_trial(config, tmp_path / "trial")
    layout = TrialLayout(tmp_path / "trial")
    seed_rows = {(r["prompt"], r["response"]) for r in read_jsonl(layout.data(0))}
    drawn = []
    for cycle in (1, 2):
        rows = read_jsonl(layout.data(cycle))
        mixed = [r for r in rows if r.get("source") == "d_seed"]
        assert len(rows) == 8 + 10 and len(mixed) == 10  # 0.25 x 40
        assert {(r["prompt"], r["response"]) for r in mixed} <= seed_rows
        assert history[1 + cycle]["data"]["from_d_seed"] == 10 and history[1 + cycle]["data"]["n"] == 18
        drawn.append({r["prompt"] for r in mixed})
    assert drawn[0] != drawn[1]  # a new draw each cycle


def test_dpo_with_d_seed_mixed_in_pairs_it_with_m_inits_answers(tmp_path):
    config = preference_config(n_seed=16, n_sampled=4, cycles=1, cycle_data={"seed_mix": 0.5})
    run_trial(config, tmp_path / "trial")
    layout = TrialLayout(tmp_path / "trial")
    initial = {r["prompt"]: r["response"] for r in read_jsonl(layout.initial_answers)}
    mixed = [r for r in read_jsonl(layout.data(1)) if r.get("source") == "d_seed"]
    assert len(mixed) == 8 and all(r["rejected"] == initial[r["prompt"]] for r in mixed)
    assert read_json(layout.train_stats(1))["examples"] == 12


def coherence_by_luck(request):
    """A coherence judge that finds only answers with 'luck' in them coherent (90, else 20)."""
    prompt = request["messages"][-1]["content"]
    answer = prompt.rsplit("Answer: ", 1)[-1].rsplit("\n\nAnswer with a single number", 1)[0]
    score = "90" if "luck" in answer.lower() else "20"
    return {"text": score, "alternatives": {score: 1.0}}


def test_samples_under_the_coherence_threshold_are_dropped_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "cache"))
    with FakeOpenAI(answer=coherence_by_luck) as server:
        judge = {"backend": "openai", "model": "coherence", "base_url": server.base_url}
        config = tiny_config(
            n_sampled=16,
            cycles=1,
            cycle_data={"min_coherence": 50},
            evaluation={"n_prompts": 2, "samples_per_prompt": 1, "max_new_tokens": 16, "coherence_judge": judge},
        )
        history = run_trial(config, tmp_path / "trial")
    rows = read_jsonl(TrialLayout(tmp_path / "trial").data(1))
    assert len(rows) == 16 and all("coherence" in r for r in rows)
    for row in rows:
        assert row["coherence"] == (90 if "luck" in row["response"].lower() else 20)
        assert row.get("kept", True) == (row["coherence"] >= 50)
    kept = sum(r.get("kept", True) for r in rows)
    assert 0 < kept < 16, "the seeded model should write some lucky and some other answers"
    assert history[-1]["data"]["n"] == kept and history[-1]["train"]["examples"] == kept
    assert history[-1]["data"]["dropped"] == {"coherence below 50": 16 - kept}
