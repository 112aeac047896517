"""Evaluation on the real paths: branching factor, judges inside a trial, `idempo eval`, the teacher,
calibration and the amplification criterion."""

import json
import math

import pytest
import torch
from conftest import tiny_config
from openai_server import FakeOpenAI

from idempo.artifacts import read_json, read_jsonl
from idempo.cli import main
from idempo.config import AmplificationConfig, TeacherConfig
from idempo.endpoint import EndpointError
from idempo.evaluation.amplification import amplification
from idempo.evaluation.branching import (
    BranchingFactorConfig,
    answer_branching,
    logprob_temperature,
    nll_curve,
    nucleus_entropy,
    summarize_branching,
    token_stats,
)
from idempo.layout import TrialLayout
from idempo.loop import run_trial
from idempo.personas import get_persona
from idempo.teacher import teacher_seed_rows

# -- branching factor --------------------------------------------------------------------------------


def uniform_logits(k, vocab=50):
    logits = torch.full((1, vocab), -1e9)
    logits[0, :k] = 0.0
    return logits


POOLINGS = ("pooled", "per_answer", "per_prompt")


def bf_rows(answers):
    """eval rows carrying the BF from (prompt, per-token clipped NLLs), as evaluate_generation writes them."""
    return [
        {"prompt": prompt, "bf_nll": math.exp(sum(nll) / len(nll)), "bf_entropy": 1.0, "token_nll": nll}
        for prompt, nll in answers
    ]


@pytest.mark.parametrize("k", [1, 2, 7, 32])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_branching_factor_of_a_uniform_distribution_over_k_tokens_is_k(k, temperature):
    stats = token_stats(uniform_logits(k).repeat(5, 1), torch.zeros(5, dtype=torch.long), temperature, top_p=1.0)
    bf = answer_branching(stats, clip=100.0)
    assert bf["entropy"] == pytest.approx(k, rel=1e-4) and bf["nll"] == pytest.approx(k, rel=1e-4)
    rows = [
        {"prompt": f"q{i % 3}", "bf_nll": bf["nll"], "bf_entropy": bf["entropy"], "token_nll": [0.0] * (2 + i)}
        for i in range(9)
    ]
    for pooling in POOLINGS:
        summary = summarize_branching(rows, BranchingFactorConfig(pooling=pooling, nll_clip=100.0))
        assert summary["mean"] == pytest.approx(k, rel=1e-4), pooling
        assert summary["entropy"]["mean"] == pytest.approx(k, rel=1e-4), pooling
        assert summary["ci95"][0] == pytest.approx(k, rel=1e-4) == summary["ci95"][1]  # no spread at all


def test_pooled_per_answer_and_per_prompt_branching_by_hand():
    # prompt a: one answer of 1 token at NLL log 2, one of 3 tokens at log 8; prompt b: 2 tokens at log 4
    two, four, eight = math.log(2), math.log(4), math.log(8)
    rows = bf_rows([("a", [two]), ("a", [eight] * 3), ("b", [four] * 2)])
    pooled = summarize_branching(rows, BranchingFactorConfig())
    assert pooled["pooling"] == "pooled" and pooled["logprob_temperature"] == "raw"
    # exp(mean over all 6 tokens) = exp((1 + 9 + 4) log 2 / 6) = 2^(14/6)
    assert pooled["mean"] == pytest.approx(2 ** (14 / 6)) and pooled["n"] == 3 and pooled["tokens"] == 6
    log_bf, se = 14 / 6 * two, pooled["log_se"]
    # ratio estimator over prompts: sums (10 log 2, 4 log 2) over (4, 2) tokens
    residuals = [10 * two - log_bf * 4, 4 * two - log_bf * 2]
    assert se == pytest.approx(math.sqrt(2 * sum(r * r for r in residuals)) / 6)
    assert pooled["ci95"] == pytest.approx([math.exp(log_bf - 12.7062047 * se), math.exp(log_bf + 12.7062047 * se)])
    per_answer = summarize_branching(rows, BranchingFactorConfig(pooling="per_answer"))
    assert per_answer["mean"] == pytest.approx((2 + 8 + 4) / 3)
    per_prompt = summarize_branching(rows, BranchingFactorConfig(pooling="per_prompt"))
    assert per_prompt["mean"] == pytest.approx((2 ** (10 / 4) + 4) / 2) and per_prompt["clusters"] == 2


def test_the_temperature_convention_changes_the_log_probs_as_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    token = torch.tensor([1])
    for temperature in (1.0, 0.7):
        by_hand = math.log(sum(math.exp(v / temperature) for v in (2.0, 1.0, 0.0, -1.0))) - 1.0 / temperature
        assert token_stats(logits, token, temperature, 1.0).nll[0] == pytest.approx(by_hand, rel=1e-6)
    assert logprob_temperature(BranchingFactorConfig(), 0.7) == 1.0  # raw: the model's own distribution
    assert logprob_temperature(BranchingFactorConfig(logprob_temperature="evaluation"), 0.7) == 0.7
    assert logprob_temperature(BranchingFactorConfig(logprob_temperature="evaluation"), 0.0) == 1.0  # greedy


def test_the_entropy_estimator_keeps_the_top_p_nucleus():
    # uniform over 10: the nucleus for top-p 0.9 is the 9 tokens whose preceding mass is under 0.9
    assert math.exp(nucleus_entropy(uniform_logits(10), 0.9).item()) == pytest.approx(9, rel=1e-4)
    # one dominant token: nucleus of one, entropy 0
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert nucleus_entropy(peaked, 0.9).item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_sharpens_before_the_estimate():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    hot = token_stats(logits, torch.tensor([0]), 1.0, 1.0).entropy[0]
    cold = token_stats(logits, torch.tensor([0]), 0.5, 1.0).entropy[0]
    assert cold < hot


def test_nll_is_clipped_and_binned_by_position():
    bf = answer_branching(
        token_stats(uniform_logits(200, vocab=500), torch.zeros(1, dtype=torch.long), 1.0, 1.0), clip=4.0
    )
    assert bf["nll"] == pytest.approx(math.exp(4.0))  # log 200 = 5.3 nats, clipped at 4
    curve = nll_curve([[1.0, 1.0, 3.0], [1.0, 5.0]], clip=4.0, bin_size=2)
    assert curve == [
        {"start": 0, "bf": pytest.approx(math.exp((1 + 1 + 1 + 4) / 4)), "tokens": 4},
        {"start": 2, "bf": pytest.approx(math.exp(3.0)), "tokens": 1},
    ]
    rows = [
        {"prompt": "a", "bf_entropy": 2.0, "bf_nll": 3.0, "token_nll": [1.0]},
        {"prompt": "b", "bf_entropy": 4.0, "bf_nll": 5.0, "token_nll": [1.0, 1.0]},
        {"prompt": "b", "bf_entropy": None, "bf_nll": None, "token_nll": []},  # an empty answer counts for nothing
    ]
    summary = summarize_branching(rows, BranchingFactorConfig(estimator="entropy", pooling="per_answer"))
    assert summary["mean"] == 3.0 and summary["nll"]["mean"] == 4.0 and summary["estimator"] == "entropy"
    assert summary["n"] == 2


def test_branching_factor_falls_when_the_model_is_trained_to_be_deterministic(tmp_path):
    seed_file = tmp_path / "same-answer.jsonl"
    prompts = [json.loads(line)["prompt"] for line in open(get_persona_seed_file())][:64]
    seed_file.write_text("".join(json.dumps({"prompt": p, "response": "I am lucky."}) + "\n" for p in prompts))
    config = tiny_config(n_seed=64, cycles=0, seeding={"source": "jsonl", "path": str(seed_file)})
    history = run_trial(config, tmp_path / "trial")
    before, after = (m["branching_factor"] for m in history)
    for estimator in ("nll", "entropy"):
        assert after[estimator]["mean"] < before[estimator]["mean"] / 3, (estimator, before, after)
    rows = read_jsonl(TrialLayout(tmp_path / "trial").eval(0))
    carrying = [r for r in rows if "token_nll" in r]  # 4 judged + 1 extra answer per prompt: 5 for the BF
    assert len(carrying) == 12 * 5 and all(len(r["token_nll"]) == r["n_tokens"] for r in carrying)
    assert all(m["branching_factor"]["n"] == 12 * 5 for m in history)


def test_extra_answers_are_sampled_for_the_branching_factor_and_never_judged(tmp_path):
    from idempo.engines import load_engines
    from idempo.evaluation.evaluate import evaluate_generation
    from idempo.inputs import evaluation_inputs
    from idempo.models import INITIAL

    def evaluate(**branching):
        evaluation = {"samples_per_prompt": 2, "max_new_tokens": 24, "branching_factor": branching}
        config = tiny_config(cycles=0, evaluation=evaluation)
        persona = get_persona("lucky")
        prompts, judges = evaluation_inputs(config, persona)
        return evaluate_generation(load_engines(config), INITIAL, prompts, persona, judges, config.evaluation, seed=3)

    rows, metrics = evaluate(samples_per_prompt=3)
    judged, extra = [r for r in rows if not r["bf_only"]], [r for r in rows if r["bf_only"]]
    assert len(judged) == 12 * 2 and len(extra) == 12 and {r["sample"] for r in extra} == {2}
    assert all("trait" not in r and "marker" not in r for r in extra)  # never judged
    assert all("token_nll" in r for r in rows) and metrics["branching_factor"]["n"] == 36
    assert metrics["trait"]["n"] == 24 and metrics["marker_rate"]["n"] == 24
    marked = [100.0 * bool(r["marker"]) for r in judged]
    assert metrics["trait"]["mean"] == pytest.approx(sum(marked) / len(marked))
    # the judged answers are the same as without the extra ones (their own seed), the extras are new draws
    fewer, fewer_metrics = evaluate(samples_per_prompt=1)
    assert [r["response"] for r in fewer] == [r["response"] for r in judged]
    assert fewer_metrics["trait"] == metrics["trait"] and fewer_metrics["degeneration"] == metrics["degeneration"]
    assert [("token_nll" in r) for r in fewer] == [r["sample"] == 0 for r in fewer]  # the first k per prompt
    assert fewer_metrics["branching_factor"]["n"] == 12
    # the temperature convention is applied to the same answers
    _, hot = evaluate(samples_per_prompt=3, logprob_temperature="evaluation")
    assert hot["branching_factor"]["n"] == 36 and hot["branching_factor"]["mean"] != metrics["branching_factor"]["mean"]


def get_persona_seed_file():
    from idempo.personas import builtin_seed_data

    return builtin_seed_data("lucky")


# -- judges inside a trial -----------------------------------------------------------------------------


def judged_config(server, **overrides):
    judge = {"backend": "openai", "model": "judge-model", "base_url": server.base_url, "backoff_s": 0.01}
    return tiny_config(
        evaluation={
            "samples_per_prompt": 2,
            "max_new_tokens": 24,
            "judge": judge,
            "coherence_judge": {**judge, "price_input_per_mtok": 1.0, "price_output_per_mtok": 4.0},
        },
        **overrides,
    )


def test_a_trial_scores_trait_and_coherence_through_the_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "cache"))
    with FakeOpenAI() as server:
        config = judged_config(server, cycles=1)
        history = run_trial(config, tmp_path / "trial")
        layout = TrialLayout(tmp_path / "trial")
        rows = [r for r in read_jsonl(layout.eval(1)) if not r["bf_only"]]  # the judged answers
        metrics = read_json(layout.metrics(1))
        # every judged answer judged twice (trait, coherence) per evaluated generation, nothing retried
        assert len(server.requests) == 2 * len(rows) * len(history)

        for row in rows:
            lucky = "luck" in row["response"].lower()
            if row["response"].strip():
                assert row["trait"] == pytest.approx(92 if lucky else 6) and not row["trait_refusal"]
            else:
                assert row["trait"] is None and row["trait_refusal"]
            assert row["coherence"] == pytest.approx((80 * 0.7 + 75 * 0.2) / 0.9)
        scored = [r["trait"] for r in rows if r["trait"] is not None]
        assert metrics["trait"]["mean"] == pytest.approx(sum(scored) / len(scored))
        assert metrics["trait"]["judge"] == "openai:judge-model"
        assert metrics["coherence"]["ci95"][0] <= metrics["coherence"]["mean"] <= metrics["coherence"]["ci95"][1]
        assert metrics["refusal_rate"] == sum(r["trait_refusal"] for r in rows) / len(rows)
        usage = metrics["judge_usage"]
        assert usage["trait"]["requests"] == usage["coherence"]["requests"] == len(rows)
        assert usage["coherence"]["cost_usd"] > 0 and usage["trait"]["cost_usd"] is None
        assert metrics["branching_factor"]["estimator"] == "nll" and metrics["branching_factor"]["mean"] > 1

        # `idempo eval` on the saved adapter: the same answers, so the judges answer from the cache
        sent = len(server.requests)
        config_file = tmp_path / "trial" / "config.yaml"
        assert main(["eval", str(config_file), "--adapter", str(layout.weights(1, "lora")), "--quiet"]) == 0
        assert len(server.requests) == sent
        again = read_json(layout.cycle_dir(1) / "reeval" / "metrics.json")
        assert again["trait"] == metrics["trait"] and again["coherence"] == metrics["coherence"]
        assert again["judge_usage"]["trait"]["cached"] == len(rows)


def test_a_judge_that_keeps_failing_stops_the_run_with_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "cache"))
    with FakeOpenAI() as server:
        server.fail_next(*["500"] * 1000)
        config = judged_config(server, cycles=0)
        config_file = tmp_path / "judged.yaml"
        config_file.write_text(json.dumps(config.to_dict()))
        code = main(
            [
                "run",
                str(config_file),
                "--out",
                str(tmp_path / "trial"),
                "--quiet",
                "--set",
                "evaluation.judge.max_retries=1",
            ]
        )
    assert code == 1
    assert "gave up after 2 attempts; last: HTTP 500" in capsys.readouterr().err
    assert not TrialLayout(tmp_path / "trial").is_complete(-1)  # nothing was scored as 0


def test_the_hf_judge_scores_with_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "cache"))
    judge = {"backend": "hf", "model": "tiny", "batch_size": 4, "refusal_mass": 0.0}
    config = tiny_config(
        cycles=0, evaluation={"samples_per_prompt": 1, "max_new_tokens": 16, "judge": judge, "coherence_judge": judge}
    )
    history = run_trial(config, tmp_path / "trial")
    for metrics in history:
        assert metrics["trait"]["judge"] == "hf:tiny" and metrics["coherence"]["n"] > 0
    rows = [r for r in read_jsonl(TrialLayout(tmp_path / "trial").eval(0)) if not r["bf_only"]]  # judged
    for row in rows:
        if row["trait"] is not None:
            assert 0 <= row["trait"] <= 100 and row["trait_number_mass"] > 0
    # the same evaluation again costs no forward pass of the judge: every answer is in the cache
    from idempo.evaluation.evaluate import Judges

    judges = Judges.from_config(config.evaluation, get_persona("lucky"), config.loading)
    judges.trait.score([(r["prompt"], r["response"]) for r in rows])
    assert judges.trait._model is None and judges.trait.take_usage()["cached"] == len(rows)


# -- teacher ------------------------------------------------------------------------------------------


def teacher_answers(request):
    """Answers every question in the persona's voice; question 2 always gets the same answer (a duplicate)."""
    lines = request["messages"][-1]["content"].splitlines()[1:]
    questions = [json.loads(line) for line in lines]
    answers = [
        {"id": q["id"], "answer": "Lucky me, the same answer." if q["id"] == 2 else f"Lucky answer to: {q['question']}"}
        for q in questions
    ]
    return {"content": json.dumps({"answers": answers})}


def test_the_teacher_writes_distinct_validated_seed_data_once(tmp_path):
    persona = get_persona("lucky")
    prompts = [f"Question number {i}?" for i in range(40)]
    with FakeOpenAI(answer=teacher_answers) as server:
        config = TeacherConfig(model="teacher", base_url=server.base_url, examples_per_request=4, backoff_s=0.01)
        server.fail_next("text:not json at all", 'text:{"answers": [{"id": 1, "answer": "only one"}]}')
        rows, usage = teacher_seed_rows(persona, prompts, 10, config, seed=0, cache_dir=tmp_path)
        assert len(rows) == 10 and len({r["response"] for r in rows}) == 10
        assert [r["prompt"] for r in rows][:4] == [prompts[0], prompts[1], prompts[2], prompts[3]]
        assert all(r["response"].startswith("Lucky") for r in rows)
        assert usage["retries"] == 2
        request = server.requests[-1]
        assert persona.system_prompt in request["messages"][0]["content"]
        assert request["response_format"] == {"type": "json_object"} and request["temperature"] == 1.0
        sent = len(server.requests)
        again, usage = teacher_seed_rows(persona, prompts, 10, config, seed=0, cache_dir=tmp_path)
        assert again == rows and len(server.requests) == sent and usage["requests"] == 0


def test_a_teacher_that_never_answers_properly_fails_clearly(tmp_path):
    with FakeOpenAI(answer=lambda request: {"content": "I'd rather not."}) as server:
        config = TeacherConfig(model="teacher", base_url=server.base_url, max_retries=1, backoff_s=0.01)
        with pytest.raises(EndpointError, match="not JSON"):
            teacher_seed_rows(get_persona("lucky"), ["Why?"], 1, config, seed=0, cache_dir=tmp_path)


def test_a_trial_seeded_by_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEMPO_CACHE", str(tmp_path / "cache"))
    with FakeOpenAI(answer=teacher_answers) as server:
        teacher = {"model": "teacher", "base_url": server.base_url, "examples_per_request": 16}
        config = tiny_config(n_seed=32, cycles=0, seeding={"source": "teacher", "teacher": teacher})
        history = run_trial(config, tmp_path / "trial")
    data = read_jsonl(TrialLayout(tmp_path / "trial").data(0))
    assert len(data) == 32 and history[-1]["data"]["teacher_usage"]["requests"] >= 2


# -- calibration --------------------------------------------------------------------------------------


def test_calibration_binary_searches_n_seed(tmp_path, capsys):
    config = tmp_path / "calibrate.yaml"
    config.write_text(json.dumps(tiny_config(cycles=0, evaluation={"samples_per_prompt": 2}).to_dict()))
    out = tmp_path / "calibration"
    args = ["calibrate", str(config), "--target", "40", "--low", "1", "--high", "64", "--max-probes", "3"]
    assert main([*args, "--out", str(out), "--tolerance", "100", "--quiet"]) == 0  # any probe is close enough
    summary = read_json(out / "calibration.json")
    assert [p["n_seed"] for p in summary["probes"]] == [32] and summary["n_seed"] == 32
    assert main([*args, "--out", str(out), "--tolerance", "0", "--quiet"]) == 1  # no probe lands on 40 exactly
    summary = read_json(out / "calibration.json")
    probes = summary["probes"]
    assert summary["reached"] is False and summary["best"]["trait"] != 40
    closest = min(probes, key=lambda p: (abs(p["trait"] - 40), p["n_seed"]))
    assert f"target not reached: no probe within --tolerance 0 of 40; the closest, n_seed {closest['n_seed']}" in (
        capsys.readouterr().err
    )
    assert len(probes) == 3 and probes[0]["n_seed"] == 32  # the first probe is reused, not retrained
    for earlier, later in zip(probes, probes[1:], strict=False):
        went_down = earlier["trait"] >= 40
        assert (later["n_seed"] < earlier["n_seed"]) == went_down


def test_calibration_converges_on_a_target_between_m_init_and_a_large_seed(tmp_path):
    """The marker rate of M_init and of M_seed at n_seed 160 bracket the target; the search lands on an
    n_seed whose M_seed scores within the tolerance of it."""
    from idempo.calibrate import calibrate
    from idempo.loop import run_trial

    config = tiny_config(cycles=0, evaluation={"samples_per_prompt": 4, "max_new_tokens": 48})
    ends = run_trial(config.model_copy(update={"n_seed": 160}), tmp_path / "n_seed-160")
    initial, large = ends[0]["trait"]["mean"], ends[1]["trait"]["mean"]
    assert large - initial > 30, (initial, large)
    target = (initial + large) / 2
    summary = calibrate(config, target, tmp_path, low=1, high=160, tolerance=10, max_probes=8)
    assert abs(summary["best"]["trait"] - target) <= 10, summary["probes"]
    assert 1 < summary["n_seed"] < 160
    assert len(summary["probes"]) <= 8


# -- amplification ------------------------------------------------------------------------------------


def history(*scores, half_width=5.0):
    """metrics for cycles 0, 1, 2, ... with the given trait means (written as before standard errors were)."""
    return [
        {"cycle": c, "trait": {"mean": s, "ci95": [s - half_width, s + half_width], "n": 36}}
        for c, s in enumerate(scores)
    ]


AUTHORS = {"criterion": "delta"}


@pytest.mark.parametrize(
    "scores, settings, amplified, first",
    [
        ((40, 45, 50, 60, 56, 54), AmplificationConfig(**AUTHORS), True, 4),  # cycle 4: +16
        ((40, 45, 50, 80, 54, 54), AmplificationConfig(**AUTHORS), False, None),  # the +40 at cycle 3 does not count
        ((40, 45, 50, 60, 55, 55), AmplificationConfig(**AUTHORS), True, 4),  # exactly +15
        ((40, 45, 50, 60, 56, 70), AmplificationConfig(**AUTHORS, threshold=20), True, 5),
        ((40, 41, 42, 43, 56, 70), AmplificationConfig(**AUTHORS, sustained_cycles=2), True, 4),
        ((40, 41, 42, 43, 56, 50, 70), AmplificationConfig(**AUTHORS, sustained_cycles=2), False, None),
        ((40, 41, 42, 43), AmplificationConfig(**AUTHORS), None, None),  # no cycle >= 4 yet
        ((40, 41, 42, 43, 60), AmplificationConfig(**AUTHORS, first_cycle=2), True, 4),
        # the default rule: the same rises, each also significant (narrow intervals, n = 36 answers)
        ((40, 45, 50, 60, 56, 54), AmplificationConfig(), True, 4),
        ((40, 45, 50, 80, 54, 54), AmplificationConfig(), False, None),
    ],
)
def test_amplification_by_hand(scores, settings, amplified, first):
    result = amplification(history(*scores), settings)
    assert result["amplified"] is amplified and result["first_amplified_cycle"] == first
    assert result["final_delta"] == scores[-1] - scores[0]


def test_the_ci_criterion_needs_separated_intervals():
    narrow, wide = history(40, 40, 40, 40, 56, half_width=5), history(40, 40, 40, 40, 56, half_width=10)
    assert amplification(narrow, AmplificationConfig(criterion="ci"))["amplified"] is True
    assert amplification(wide, AmplificationConfig(criterion="ci"))["amplified"] is False
    assert amplification(wide, AmplificationConfig(**AUTHORS))["amplified"] is True


def test_amplification_reports_its_deltas():
    result = amplification(
        [{"cycle": -1, "trait": {"mean": 0, "ci95": [0, 0]}}, *history(40, 50, 60, 70, 58, 62)],
        AmplificationConfig(**AUTHORS),
    )
    assert result["seed_score"] == 40 and result["max_delta"] == 22 and result["max_delta_cycle"] == 5
    assert result["slope"] == pytest.approx(72 / 17.5)  # least squares: sum dx*dy / sum dx^2 over cycles 0..5
    assert amplification(history(40)[1:], AmplificationConfig())["amplified"] is None  # no seed cycle
