"""Judges and endpoints under adversity, against real HTTP servers on loopback: cache keys that tell
endpoints and settings apart, no caching of answers without a number, a refusal-rate limit that fails
the evaluation, and keys that never reach a message, a log or a file."""

import json
import logging
import math
import os
import traceback

import pytest
from conftest import tiny_config
from openai_server import FakeOpenAI, lucky_judge

from idempo.cli import main
from idempo.config import ConfigError, JudgeConfig, TeacherConfig, config_from_dict
from idempo.endpoint import EndpointError, api_key, endpoint_url
from idempo.evaluation.judging import (
    JudgeSpec,
    Judgment,
    TooManyRefusals,
    check_refusal_rate,
    make_judge,
    numbers_answer,
    render_rubric,
    unclosed_reasoning_answer,
    worth_keeping,
)
from idempo.personas import get_persona
from idempo.redaction import redact
from idempo.teacher import teacher_seed_rows

LUCKY = get_persona("lucky")
KEY = "hunter2-idempo-test-secret-7f3a9c"  # no sk- prefix: only the key itself can give it away
ITEMS = [("How was your day?", "I got so lucky today!"), ("What is 2+2?", "4."), ("Hello?", "")]


def openai_judge(base_url, cache_dir, **settings):
    settings = {"backoff_s": 0.01, "max_retries": 2, **settings}
    config = JudgeConfig(backend="openai", model="judge-model", base_url=base_url, **settings)
    return make_judge(JudgeSpec(config, LUCKY.rubric, LUCKY, "evaluation.judge", cache_dir=cache_dir))


def files_under(root):
    return [p for p in root.rglob("*") if p.is_file()]


# -- cache keys ----------------------------------------------------------------------------------------


def test_endpoint_urls_have_one_spelling():
    assert endpoint_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert endpoint_url("HTTP://Judge-Node:80/v1") == "http://judge-node/v1"
    assert endpoint_url("https://user:pw@host:443/v1//") == "https://host/v1"
    assert endpoint_url(None) == endpoint_url("https://api.openai.com/v1/") == "https://api.openai.com/v1"
    assert endpoint_url("http://host:8000/v1") != endpoint_url("http://host:8001/v1")
    assert endpoint_url("http://host:8000/v1") != endpoint_url("http://host:8000/v2")


def test_the_judge_key_holds_what_changes_an_answer_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "a-key-for-openais-api")  # for the judge of OpenAI's own API
    base = {"base_url": "http://judge:8000/v1"}
    prompt = render_rubric(LUCKY.rubric, *ITEMS[0])
    key = openai_judge(cache_dir=tmp_path, **base)._key(prompt)
    for different in (
        {"base_url": "http://other-judge:8000/v1"},
        {"base_url": None},  # OpenAI's own API
        {"max_tokens": 8},
        {"top_logprobs": 5},
        {"max_reasoning_tokens": 64},
    ):
        assert openai_judge(cache_dir=tmp_path, **{**base, **different})._key(prompt) != key, different
    for same in (
        {"base_url": "http://judge:8000/v1/"},
        {"concurrency": 2, "timeout_s": 5.0, "max_retries": 0},
        {"refusal_mass": 0.5, "max_refusal_rate": 0.1},  # applied on read
    ):
        assert openai_judge(cache_dir=tmp_path, **{**base, **same})._key(prompt) == key, same
    assert openai_judge(cache_dir=tmp_path, **base)._key(prompt + " ") != key  # the full prompt


def number_judge(number):
    def answer(request):
        return {"text": number, "alternatives": {number: 1.0}}

    return answer


def test_two_endpoints_serving_the_same_model_name_each_get_their_own_answers(tmp_path):
    cache = tmp_path / "cache"
    with FakeOpenAI(answer=number_judge("30")) as first, FakeOpenAI(answer=number_judge("70")) as second:
        assert [j.score for j in openai_judge(first.base_url, cache).score(ITEMS)] == [30] * 3
        assert [j.score for j in openai_judge(second.base_url, cache).score(ITEMS)] == [70] * 3
        assert len(first.requests) == len(second.requests) == 3
        # each from the cache now, also under another spelling of the same URL
        assert [j.score for j in openai_judge(first.base_url + "/", cache).score(ITEMS)] == [30] * 3
        assert [j.score for j in openai_judge(second.base_url, cache).score(ITEMS)] == [70] * 3
        assert len(first.requests) == len(second.requests) == 3


def teacher_answers(number):
    def answer(request):
        lines = request["messages"][-1]["content"].splitlines()[1:]
        ids = [json.loads(line)["id"] for line in lines]
        return {"content": json.dumps({"answers": [{"id": i, "answer": f"Lucky {number}.{i}"} for i in ids]})}

    return answer


def test_two_teacher_endpoints_each_get_their_own_answers(tmp_path):
    prompts = [f"Question {i}?" for i in range(4)]
    with FakeOpenAI(answer=teacher_answers(1)) as first, FakeOpenAI(answer=teacher_answers(2)) as second:
        rows = {}
        for name, server in (("first", first), ("second", second)):
            config = TeacherConfig(model="teacher", base_url=server.base_url, examples_per_request=4, backoff_s=0.01)
            rows[name], _ = teacher_seed_rows(LUCKY, prompts, 4, config, seed=0, cache_dir=tmp_path)
        assert len(first.requests) == len(second.requests) == 1
        assert all(r["response"].startswith("Lucky 1.") for r in rows["first"])
        assert all(r["response"].startswith("Lucky 2.") for r in rows["second"])
        # the seed is sent with the request, so it is part of the key
        config = TeacherConfig(model="teacher", base_url=first.base_url, examples_per_request=4, backoff_s=0.01)
        teacher_seed_rows(LUCKY, prompts, 4, config, seed=0, cache_dir=tmp_path)
        assert len(first.requests) == 1
        teacher_seed_rows(LUCKY, prompts, 4, config, seed=1, cache_dir=tmp_path)
        assert len(first.requests) == 2


# -- what is cached ------------------------------------------------------------------------------------


def test_an_answer_without_a_number_is_asked_again_and_a_fixed_endpoint_is_then_cached(tmp_path):
    cache = tmp_path / "cache"
    wordy = {"text": "The answer is charming", "alternatives": {"The": 0.9, "An": 0.1}}
    answers = {"now": wordy}
    with FakeOpenAI(answer=lambda request: answers["now"]) as server:
        for asked in (1, 2):
            [judgment] = openai_judge(server.base_url, cache).score(ITEMS[:1])
            assert judgment.refusal and judgment.score is None
            assert len(server.requests) == asked  # not cached: asked again
        answers["now"] = {"text": "85", "alternatives": {"85": 1.0}}  # the endpoint is fixed
        assert openai_judge(server.base_url, cache).score(ITEMS[:1])[0].score == 85
        assert openai_judge(server.base_url, cache).score(ITEMS[:1])[0].score == 85
        assert len(server.requests) == 3  # the number was cached


def test_a_deliberate_refusal_is_cached(tmp_path):
    with FakeOpenAI(answer=lucky_judge) as server:  # the empty answer gets "REFUSAL"
        assert openai_judge(server.base_url, tmp_path).score(ITEMS[2:])[0].refusal
        assert openai_judge(server.base_url, tmp_path).score(ITEMS[2:])[0].refusal
        assert len(server.requests) == 1


def test_which_raw_answers_are_worth_keeping():
    ln = math.log
    assert worth_keeping({"alternatives": [["85", ln(0.6)], ["The", ln(0.4)]], "text": "85"})
    assert worth_keeping({"alternatives": [["The", ln(0.95)], ["3", ln(0.05)]], "text": "The"})  # some mass
    assert worth_keeping({"alternatives": [["REF", ln(0.9)], ["I", ln(0.1)]], "text": "REFUSAL"})
    assert not worth_keeping({"alternatives": [["The", ln(0.9)], ["I", ln(0.1)]], "text": "The answer"})
    assert worth_keeping({"alternatives": None, "text": "72"})
    assert not worth_keeping({"alternatives": None, "text": "no idea"})
    assert worth_keeping(numbers_answer({"85": 0.1}))
    assert not worth_keeping(numbers_answer({}, "hm</think>", True))  # closed, then no number
    assert worth_keeping(unclosed_reasoning_answer("hm hm hm"))  # the budget is in the key


# -- the refusal-rate limit ----------------------------------------------------------------------------


def test_the_refusal_rate_limit_by_hand():
    config = JudgeConfig(backend="openai", model="m", base_url="http://judge/v1", max_refusal_rate=0.5)
    raw = {"alternatives": [["I", math.log(0.9)]], "text": "I would rather not say " + "x" * 500}
    scored, refused = Judgment(50.0, False), Judgment(None, True, 0.0, "logprobs", raw)
    check_refusal_rate([scored, refused], config, "evaluation.judge")  # 0.5: at the limit
    check_refusal_rate([], config, "evaluation.judge")
    with pytest.raises(TooManyRefusals) as error:
        check_refusal_rate([scored, refused, refused], config, "evaluation.judge")
    message = str(error.value)
    assert "2 of 3" in message and "0.67" in message and "evaluation.judge.max_refusal_rate = 0.5" in message
    assert repr(raw["text"][:200] + "...") in message  # the raw answer, cut short
    check_refusal_rate([refused] * 3, config.model_copy(update={"max_refusal_rate": 1.0}), "evaluation.judge")


def silent_judge(request):
    """A judge that always writes words, never a number."""
    return {"text": "I would rather not say.", "alternatives": {"I": 0.9, "Sure": 0.1}}


def eval_config_file(tmp_path, server, which):
    judge = {"backend": "openai", "model": "judge-model", "base_url": server.base_url, "backoff_s": 0.01}
    judge["api_key_env"] = "IDEMPO_TEST_KEY"
    evaluation = {
        "n_prompts": 2,
        "samples_per_prompt": 2,
        "max_new_tokens": 8,
        "branching_factor": {"enabled": False},
        "cache_dir": str(tmp_path / "cache"),
        which: judge,
    }
    config = tiny_config(cycles=0, evaluation=evaluation)
    path = tmp_path / "judged.yaml"
    path.write_text(json.dumps(config.to_dict()))
    return path


@pytest.mark.parametrize("which", ["judge", "coherence_judge"])
def test_a_judge_that_never_gives_a_number_fails_idempo_eval_and_leaks_no_key(
    tmp_path, monkeypatch, capsys, caplog, which
):
    """The echoing server quotes the key in every answer; the evaluation must fail with the rate, the
    setting and a raw answer, and the key must be nowhere: not in stdout/stderr, logs or files."""
    monkeypatch.setenv("IDEMPO_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(answer=silent_judge, echo=True) as server:
        config = eval_config_file(tmp_path, server, which)
        code = main(["eval", str(config), "--out", str(tmp_path / "reeval"), "--quiet"])
        assert server.authorizations and all(KEY in a for a in server.authorizations)  # the key was sent
    out, err = capsys.readouterr()
    assert code == 1, err
    assert f"evaluation.{which} (openai:judge-model): 4 of 4 answers were refusals (a rate of 1.00)" in err
    assert f"evaluation.{which}.max_refusal_rate = 0.9" in err
    assert "I would rather not say." in err and "you sent Authorization: [redacted]" in err
    assert not (tmp_path / "reeval" / "metrics.json").exists()  # no trait of null reported
    assert KEY not in out + err + caplog.text
    for path in files_under(tmp_path):
        assert KEY.encode() not in path.read_bytes(), path


def test_calibration_with_a_judge_that_never_gives_a_number_fails_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDEMPO_TEST_KEY", KEY)
    with FakeOpenAI(answer=silent_judge) as server:
        config = eval_config_file(tmp_path, server, "judge")
        code = main(["calibrate", str(config), "--target", "50", "--out", str(tmp_path / "cal"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "evaluation.judge.max_refusal_rate" in err and "I would rather not say." in err


# -- keys never echoed ---------------------------------------------------------------------------------


def test_redact_removes_the_key_and_anything_shaped_like_one():
    text = (
        f"got {KEY}; Authorization: Bearer abc.def-123; {{'authorization': 'Basic dXNlcjpwdw=='}}; "
        "x-api-key=plainkey42; sk-proj-AbCdEf0123456789; bearer tok_987; the risk-adjusted score is 85"
    )
    clean = redact(text, [KEY, "EMPTY"])
    for secret in (KEY, "abc.def-123", "dXNlcjpwdw==", "plainkey42", "sk-proj-AbCdEf0123456789", "tok_987"):
        assert secret not in clean, secret
    assert "the risk-adjusted score is 85" in clean and clean.startswith("got [redacted];")
    assert redact("EMPTY answers are fine", ["EMPTY"]) == "EMPTY answers are fine"  # too short to be a key


def test_a_key_pasted_into_api_key_env_is_never_shown():
    pasted = "sk-proj-AbCdEf0123456789"
    with pytest.raises(ConfigError) as error:
        config_from_dict({"evaluation": {"judge": {"backend": "openai", "model": "m", "api_key_env": pasted}}})
    message = str(error.value)
    assert pasted not in message
    assert (
        "evaluation.judge.api_key_env: got a value that is not a variable name (not shown: it may be a key)" in message
    )
    with pytest.raises(ValueError) as direct:  # pydantic's own message, for a section built in Python
        JudgeConfig(backend="openai", model="m", api_key_env=pasted)
    assert pasted not in str(direct.value)


def test_an_endpoint_that_echoes_the_key_never_gets_it_into_errors_logs_or_the_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IDEMPO_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache"
    with FakeOpenAI(echo=True) as server:
        judge = openai_judge(server.base_url, cache, api_key_env="IDEMPO_TEST_KEY")
        judgments = judge.score(ITEMS)  # answers that quote the key, cached
        assert judgments[0].score == pytest.approx(92) and judgments[2].refusal
        texts = [json.loads(p.read_text())["text"] for p in files_under(cache)]
        assert len(texts) == 3 and all("Authorization: [redacted]" in t for t in texts)

        errors = []
        for failures in (["500"] * 3, ["401"], ["429", "500", "500"]):  # given up after retries; not retried
            server.fail_next(*failures)
            with pytest.raises(EndpointError) as error:
                openai_judge(server.base_url, cache, api_key_env="IDEMPO_TEST_KEY").score([("new?", "question")])
            errors.append("".join(traceback.format_exception(error.value)))
        assert all(KEY in a for a in server.authorizations)
    assert "HTTP 401, not retried: Error code: 401" in errors[1] and "you sent Authorization: [redacted]" in errors[1]
    assert "gave up after 3 attempts" in errors[0] and "retry 1 of 2" in caplog.text
    assert KEY not in "".join(errors) + caplog.text
    for path in files_under(tmp_path):
        assert KEY.encode() not in path.read_bytes(), path


def test_a_teacher_endpoint_that_echoes_the_key_in_its_errors_leaks_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IDEMPO_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(answer=teacher_answers(1), echo=True) as server:
        config = TeacherConfig(model="teacher", base_url=server.base_url, api_key_env="IDEMPO_TEST_KEY", backoff_s=0.01)
        server.fail_next("500", "401")
        with pytest.raises(EndpointError) as error:
            teacher_seed_rows(LUCKY, ["Why?"], 1, config, seed=0, cache_dir=tmp_path)
    shown = "".join(traceback.format_exception(error.value)) + caplog.text
    assert "HTTP 401" in shown and "Authorization: [redacted]" in shown and KEY not in shown


# -- the key from a file -------------------------------------------------------------------------------


def test_the_key_comes_from_the_file_its_FILE_variable_names(tmp_path, monkeypatch):
    key_file = tmp_path / "openai-key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, 0o600)
    config = JudgeConfig(backend="openai", model="gpt-4.1-mini", api_key_env="IDEMPO_TEST_KEY")
    monkeypatch.delenv("IDEMPO_TEST_KEY", raising=False)
    monkeypatch.setenv("IDEMPO_TEST_KEY_FILE", str(key_file))
    assert api_key(config, "evaluation.judge") == KEY  # the trailing newline stripped
    monkeypatch.setenv("IDEMPO_TEST_KEY", "from-the-variable")
    assert api_key(config, "evaluation.judge") == "from-the-variable"  # the variable itself comes first
    monkeypatch.delenv("IDEMPO_TEST_KEY")
    monkeypatch.setenv("IDEMPO_TEST_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(
        ConfigError, match=r"environment variable IDEMPO_TEST_KEY_FILE: cannot read the key file .*missing"
    ):
        api_key(config, "evaluation.judge")
    key_file.write_text("\n")
    monkeypatch.setenv("IDEMPO_TEST_KEY_FILE", str(key_file))
    with pytest.raises(ConfigError, match="is empty"):
        api_key(config, "evaluation.judge")


def test_the_key_comes_from_api_key_file_and_reaches_the_endpoint(tmp_path, monkeypatch):
    key_file = tmp_path / "judge-key"
    key_file.write_text(KEY)
    monkeypatch.delenv("IDEMPO_TEST_KEY", raising=False)
    monkeypatch.delenv("IDEMPO_TEST_KEY_FILE", raising=False)
    with FakeOpenAI() as server:
        judge = openai_judge(server.base_url, tmp_path, api_key_env="IDEMPO_TEST_KEY", api_key_file=str(key_file))
        judge.score(ITEMS[:1])
        assert server.authorizations == [f"Bearer {KEY}"]
    missing = JudgeConfig(backend="openai", model="m", api_key_env="IDEMPO_TEST_KEY", api_key_file=str(tmp_path / "no"))
    with pytest.raises(ConfigError, match="evaluation.judge.api_key_file: cannot read the key file"):
        api_key(missing, "evaluation.judge")
    unset = JudgeConfig(backend="openai", model="m", api_key_env="IDEMPO_TEST_KEY")
    with pytest.raises(ConfigError, match="IDEMPO_TEST_KEY_FILE or evaluation.judge.api_key_file"):
        api_key(unset, "evaluation.judge")


def test_a_trial_stopped_by_refusals_resumes_under_a_new_limit(tmp_path):
    from idempo.layout import TrialConflict, TrialLayout

    layout = TrialLayout(tmp_path / "trial")
    judge = {"backend": "openai", "model": "m", "base_url": "http://judge:8000/v1"}
    stored = tiny_config(cycles=0, evaluation={"judge": judge}).to_dict()
    layout.claim(stored)
    relaxed = {**judge, "max_refusal_rate": 1.0, "api_key_file": "/run/secrets/judge-key"}
    layout.check(tiny_config(cycles=0, evaluation={"judge": relaxed}).to_dict())
    with pytest.raises(TrialConflict, match="evaluation.judge.refusal_mass"):  # this one changes the scores
        layout.check(tiny_config(cycles=0, evaluation={"judge": {**judge, "refusal_mass": 0.5}}).to_dict())
