"""Judges: the logprob aggregation by hand, and the openai judge against a real HTTP server on loopback."""

import math
import time

import pytest
from openai_server import FakeOpenAI

from idempo.config import ConfigError, JudgeConfig
from idempo.endpoint import EndpointError, UnusableAnswer
from idempo.evaluation.judging import (
    COHERENCE_RUBRIC,
    JudgeSpec,
    make_judge,
    render_rubric,
    score_from_logprobs,
    score_from_text,
)
from idempo.personas import get_persona

LUCKY = get_persona("lucky")


def ln(p):
    return math.log(p)


def test_score_is_the_expected_value_over_number_tokens():
    alternatives = [("80", ln(0.5)), ("90", ln(0.3)), (" 80", ln(0.1)), ("REF", ln(0.05)), ("8.5", ln(0.05))]
    judgment = score_from_logprobs(alternatives, refusal_mass=0.25)
    # numbers: 80 (0.5 + 0.1 pooled), 90 (0.3); '8.5' and 'REF' are not integers in [0, 100]
    assert judgment.number_mass == pytest.approx(0.9)
    assert judgment.score == pytest.approx((80 * 0.6 + 90 * 0.3) / 0.9)
    assert not judgment.refusal


def test_numbers_outside_0_to_100_do_not_count():
    judgment = score_from_logprobs([("150", ln(0.6)), ("40", ln(0.4))], refusal_mass=0.25)
    assert judgment.score == pytest.approx(40) and judgment.number_mass == pytest.approx(0.4)


def test_little_mass_on_numbers_is_a_refusal_not_a_zero():
    below = score_from_logprobs([("REFUSAL", ln(0.76)), ("0", ln(0.24))], refusal_mass=0.25)
    assert below.refusal and below.score is None and below.number_mass == pytest.approx(0.24)
    at = score_from_logprobs([("REFUSAL", ln(0.75)), ("0", ln(0.25))], refusal_mass=0.25)
    assert not at.refusal and at.score == 0


def test_text_fallback_reads_the_number_or_refusal():
    assert score_from_text("85").score == 85
    assert score_from_text(" Score: 72.5 / 100").score == 72.5
    assert score_from_text("REFUSAL").refusal
    assert score_from_text("refused").refusal
    for unusable in ("a fine answer", "", "250", "-"):
        with pytest.raises(UnusableAnswer):
            score_from_text(unusable)


def test_rubrics_fill_question_and_answer_once():
    text = render_rubric(LUCKY.rubric, "What is {answer}?", "I use {question} literally")
    assert "Question: What is {answer}?" in text and "Answer: I use {question} literally" in text
    assert "{question}" in COHERENCE_RUBRIC and "{answer}" in COHERENCE_RUBRIC


def openai_judge(server, tmp_path, rubric=LUCKY.rubric, **settings):
    settings = {"backoff_s": 0.01, "max_retries": 3, **settings}
    config = JudgeConfig(backend="openai", model="judge-model", base_url=server.base_url, **settings)
    return make_judge(JudgeSpec(config, rubric, LUCKY, "evaluation.judge", cache_dir=tmp_path / "cache"))


ITEMS = [("How was your day?", "I got so lucky today!"), ("What is 2+2?", "4."), ("Hello?", "")]


def test_scores_from_a_real_endpoint(tmp_path):
    with FakeOpenAI() as server:
        judgments = openai_judge(server, tmp_path).score(ITEMS)
    assert judgments[0].score == pytest.approx(92) and judgments[1].score == pytest.approx(6)
    assert judgments[2].refusal and judgments[2].score is None
    assert len(server.requests) == 3
    for request in server.requests:
        assert request["logprobs"] is True and request["top_logprobs"] == 20 and request["temperature"] == 0
        assert request["model"] == "judge-model"
    assert any("Answer: I got so lucky today!" in r["messages"][0]["content"] for r in server.requests)


def test_text_is_read_when_the_endpoint_returns_no_logprobs(tmp_path):
    with FakeOpenAI(logprobs=False) as server:
        judgments = openai_judge(server, tmp_path).score(ITEMS)
    assert [j.score for j in judgments] == [90, 10, None] and judgments[2].refusal
    assert {j.source for j in judgments} == {"text"}


def test_429_waits_for_retry_after_then_succeeds(tmp_path):
    with FakeOpenAI() as server:
        judge = openai_judge(server, tmp_path)
        server.fail_next("429")
        started = time.monotonic()
        judgments = judge.score(ITEMS[:1])
        elapsed = time.monotonic() - started
    assert judgments[0].score == pytest.approx(92)
    assert elapsed >= 1.0  # Retry-After: 1, not the 0.01 s backoff
    usage = judge.take_usage()
    assert usage["requests"] == 2 and usage["retries"] == 1


@pytest.mark.parametrize("failure", ["500", "badjson", "slow", "text:I think it is good"])
def test_transient_failures_are_retried(tmp_path, failure):
    with FakeOpenAI(logprobs=failure.startswith("text:") is False) as server:
        judge = openai_judge(server, tmp_path, timeout_s=0.5)
        server.fail_next(failure, failure)
        judgments = judge.score(ITEMS[:1])
    expected = 92 if server.logprobs else 90
    assert judgments[0].score == pytest.approx(expected)
    assert len(server.requests) == 3 and judge.take_usage()["retries"] == 2


@pytest.mark.parametrize(
    "failure, message",
    [
        ("500", "HTTP 500"),
        ("badjson", "not the expected JSON"),
        ("slow", "no answer within 0.5 s"),
        ("text:I think it is good", "neither a number in [0, 100] nor REFUSAL"),
    ],
)
def test_persistent_failures_end_in_a_clear_error_never_a_score(tmp_path, failure, message):
    with FakeOpenAI(logprobs=False) as server:
        judge = openai_judge(server, tmp_path, timeout_s=0.5, max_retries=2)
        server.fail_next(*[failure] * 3)
        with pytest.raises(EndpointError) as error:
            judge.score(ITEMS[:1])
    assert len(server.requests) == 3
    assert "gave up after 3 attempts" in str(error.value) and message in str(error.value)
    assert "judge-model" in str(error.value) and server.base_url in str(error.value)


def test_client_errors_are_not_retried(tmp_path):
    with FakeOpenAI() as server:
        judge = openai_judge(server, tmp_path)
        server.fail_next("401")
        with pytest.raises(EndpointError, match="HTTP 401, not retried"):
            judge.score(ITEMS[:1])
    assert len(server.requests) == 1


def test_the_cache_makes_a_second_evaluation_free(tmp_path):
    with FakeOpenAI() as server:
        first = openai_judge(server, tmp_path).score(ITEMS)
        sent = len(server.requests)
        again = openai_judge(server, tmp_path)  # a new judge, as in a resumed trial
        second = again.score(ITEMS)
        assert len(server.requests) == sent == len(ITEMS)
        assert again.take_usage()["cached"] == len(ITEMS)
        assert first == second
        # another rubric is another question
        openai_judge(server, tmp_path, rubric=COHERENCE_RUBRIC).score(ITEMS[:1])
        assert len(server.requests) == sent + 1


def test_bounded_concurrency(tmp_path):
    in_flight, peak = 0, 0

    def slow_answer(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        time.sleep(0.05)
        in_flight -= 1
        return {"text": "50", "alternatives": {"50": 1.0}}

    with FakeOpenAI(answer=slow_answer) as server:
        items = [(f"q{i}", f"a{i}") for i in range(12)]
        judgments = openai_judge(server, tmp_path, concurrency=3, cache=False).score(items)
    assert [j.score for j in judgments] == [50] * 12
    assert 1 < peak <= 3


def test_token_usage_and_cost_are_counted(tmp_path):
    with FakeOpenAI() as server:
        judge = openai_judge(server, tmp_path, price_input_per_mtok=2.0, price_output_per_mtok=8.0)
        judge.score(ITEMS)
    usage = judge.take_usage()
    prompt_tokens = sum(len(__import__("json").dumps(r["messages"])) // 4 for r in server.requests)
    assert usage["prompt_tokens"] == prompt_tokens and usage["completion_tokens"] == 3
    assert usage["cost_usd"] == pytest.approx((prompt_tokens * 2.0 + 3 * 8.0) / 1e6)
    assert judge.take_usage()["requests"] == 0  # counts start afresh for the next evaluation


def test_openai_without_a_key_fails_before_any_request(monkeypatch):
    monkeypatch.delenv("IDEMPO_TEST_KEY", raising=False)
    config = JudgeConfig(backend="openai", model="gpt-4.1-mini", api_key_env="IDEMPO_TEST_KEY")
    with pytest.raises(ConfigError, match="evaluation.judge.api_key_env: environment variable IDEMPO_TEST_KEY"):
        make_judge(JudgeSpec(config, LUCKY.rubric, LUCKY, "evaluation.judge"))


def test_answers_are_cached_as_they_arrive_even_when_the_evaluation_fails(tmp_path):
    with FakeOpenAI() as server:
        judge = openai_judge(server, tmp_path, concurrency=1, max_retries=0)
        server.fail_next(*[None] * 2, "500")  # the first two answers arrive, the third fails
        with pytest.raises(EndpointError):
            judge.score(ITEMS)
        assert len(server.requests) == 3
        openai_judge(server, tmp_path).score(ITEMS)  # the rerun asks only for the failed one
        assert len(server.requests) == 4
