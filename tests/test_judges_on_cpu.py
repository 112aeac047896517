"""Judges: the logprob aggregation by hand, the openai judge against a real HTTP server on loopback
(OpenAI's chat protocol, and vLLM's tokenize and completions endpoints), and the hf judge on real
weights, over whole numbers on a tokenizer that writes them digit by digit."""

import math
import string
import time

import pytest
import torch
from openai_server import FakeOpenAI, ScriptedModel

from idempo.cache import DiskCache, cache_key
from idempo.config import ConfigError, JudgeConfig, LoadingConfig
from idempo.endpoint import EndpointError, UnusableAnswer
from idempo.evaluation.judging import (
    COHERENCE_RUBRIC,
    JudgeSpec,
    make_judge,
    render_rubric,
    score_from_logprobs,
    score_from_text,
)
from idempo.evaluation.numbers import splits_numbers, trie_leaves, trie_nodes
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
    # the server's /tokenize (absent: not vLLM), the 429, the answer
    assert usage["requests"] == 3 and usage["retries"] == 1
    assert [path for path, _ in server.received] == ["/tokenize", "/v1/chat/completions", "/v1/chat/completions"]


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


# -- whole numbers on a tokenizer that writes them digit by digit ------------------------------------
#
# One "model" written down twice: as real weights for the hf judge (a one-layer Qwen3 whose attention
# and MLP add nothing, so its next-token distribution is a table over the last token) and as a
# vLLM-speaking server. Its tokenizer has one token per character: every number is split into digits.

SPECIAL = ["<pad>", "<eos>", "<unk>"]
VOCAB = [*SPECIAL, "<think>", "</think>", *string.digits, *string.ascii_letters, *" \n.:,?!'"]
NUMBERS = {"8": 0.6, "9": 0.2, " ": 0.1, "R": 0.1}  # the first answer token
SCRIPT = {
    "A": NUMBERS,  # a judge prompt ending in "A" is answered with a number
    "\n": NUMBERS,  # ... and so is one after the reasoning closed ("</think>\n")
    " ": {"8": 1.0},
    "8": {"0": 0.5, "5": 0.3, "<eos>": 0.2},
    "9": {"<eos>": 0.8, "7": 0.2},
    "0": {"<eos>": 0.7, "0": 0.3},  # "800" is no number in 0..100
    "B": {"R": 0.9, "3": 0.1},  # a judge prompt ending in "B" mostly refuses
    "<think>": {"h": 1.0},
    "h": {"m": 1.0},
    "m": {"</think>": 1.0},
    "</think>": {"\n": 1.0},
}  # any other last token: <eos>
# p(v) = P(tokens of v) * P(the number ends after them), "v" and " v" pooled, by hand:
P = {
    8: 0.6 * 0.2 + 0.1 * 1.0 * 0.2,
    80: 0.6 * 0.5 * 0.7 + 0.1 * 1.0 * 0.5 * 0.7,
    85: 0.6 * 0.3 * 1.0 + 0.1 * 1.0 * 0.3 * 1.0,
    9: 0.2 * 0.8,
    97: 0.2 * 0.2 * 1.0,
}
MASS = sum(P.values())  # 0.795: "R..." and "800" are no numbers in 0..100
SCORE = sum(v * p for v, p in P.items()) / MASS  # 55.21; the first digit alone would read 7.2

PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt's last token is the answer's
THINKING_ONLY = PLAIN + "{% if add_generation_prompt %}<think>{% endif %}"
HYBRID = (
    PLAIN + "{% if add_generation_prompt %}{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>\n{% else %}<think>{% endif %}{% endif %}"
)
RUBRIC = "{answer}"
SCRIPTED_ITEMS = [("q1", "A"), ("q2", "B"), ("q3", "xyzA")]  # prompts of different lengths: left padding


def test_the_hand_computation():
    assert MASS == pytest.approx(0.795) and SCORE == pytest.approx(55.2075, abs=1e-4)


def build_scripted_model(path, chat_template):
    """The script as a tokenizer and real weights on disk, loadable by AutoModelForCausalLM."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    size, hidden = len(VOCAB), 128
    config = Qwen3Config(
        vocab_size=size,
        hidden_size=hidden,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        rms_norm_eps=1e-12,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=VOCAB.index("<eos>"),
        pad_token_id=VOCAB.index("<pad>"),
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    table = torch.full((size, size), -1e4)  # table[next, last] = log P(next | last)
    for last, token in enumerate(VOCAB):
        for following, probability in SCRIPT.get(token, {"<eos>": 1.0}).items():
            table[VOCAB.index(following), last] = math.log(probability)
    with torch.no_grad():
        # one-hot embeddings, layers that add nothing: the final norm scales e_last by sqrt(hidden)
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :size] = torch.eye(size)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :size] = table / math.sqrt(hidden)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scripted_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    return {
        name: str(build_scripted_model(root / name, template))
        for name, template in (("plain", PLAIN), ("thinking", THINKING_ONLY), ("hybrid", HYBRID))
    }


def hf_judge(model_dir, tmp_path, **settings):
    config = JudgeConfig(backend="hf", model=model_dir, **settings)
    loading = LoadingConfig(device="cpu", dtype="float32")
    return make_judge(JudgeSpec(config, RUBRIC, LUCKY, "evaluation.judge", loading, tmp_path / "cache"))


def assert_scripted(judgments):
    """A, xyzA: the hand-computed whole-number score; B: a refusal (0.1 on the number 3)."""
    first, refused, padded = judgments
    for judgment in (first, padded):
        assert not judgment.refusal and judgment.source == "logprobs"
        assert judgment.score == pytest.approx(SCORE, abs=1e-5)
        assert judgment.number_mass == pytest.approx(MASS, abs=1e-6)
    assert refused.refusal and refused.score is None and refused.number_mass == pytest.approx(0.1, abs=1e-6)


def assert_scored_after_reasoning(judgments):
    """After a closed reasoning block every prompt ends in "</think>\n", which is answered like A."""
    for judgment in judgments:
        assert not judgment.refusal and judgment.score == pytest.approx(SCORE, abs=1e-5)
        assert judgment.number_mass == pytest.approx(MASS, abs=1e-6)


def test_hf_judge_reads_whole_numbers_on_a_digit_splitting_tokenizer(scripted_models, tmp_path):
    judge = hf_judge(scripted_models["plain"], tmp_path, batch_size=2, continuation_batch=7)
    assert_scripted(judge.score(SCRIPTED_ITEMS))
    assert splits_numbers(judge.trie.paths)  # "85" is "8" "5"; " 85" is " " "8" "5"
    assert judge.trie.paths["85"] == (VOCAB.index("8"), VOCAB.index("5"))
    assert judge.trie.paths[" 100"] == tuple(VOCAB.index(c) for c in " 100")
    raw = DiskCache(tmp_path / "cache").get(judge._key("A"))  # the raw answer, not the score
    assert raw["form"] == "numbers" and raw["probabilities"]["80"] == pytest.approx(0.21, abs=1e-6)
    assert raw["probabilities"][" 80"] == pytest.approx(0.035, abs=1e-6) and raw["reasoning"] is None
    again = hf_judge(scripted_models["plain"], tmp_path, refusal_mass=0.05)  # from the cache, rescored
    assert again.score(SCRIPTED_ITEMS)[1].score == pytest.approx(3) and again._model is None


def test_hf_judge_reasons_first_when_the_template_leaves_the_block_open(scripted_models, tmp_path):
    # "A<think>": the judge writes "hm</think>" then "\n", and its number is read after that
    judge = hf_judge(scripted_models["thinking"], tmp_path, batch_size=3, max_reasoning_tokens=3)
    assert_scored_after_reasoning(judge.score(SCRIPTED_ITEMS))
    assert DiskCache(tmp_path / "cache").get(judge._key("A"))["reasoning"] == "hm</think>\n"
    unclosed = hf_judge(scripted_models["thinking"], tmp_path, max_reasoning_tokens=2).score(SCRIPTED_ITEMS)
    assert all(j.refusal and j.score is None and j.source == "reasoning" for j in unclosed)


def test_hf_judge_turns_thinking_off_where_the_template_allows_it(scripted_models, tmp_path):
    # with enable_thinking=False the template closes the block itself; a budget of 1 could not close it
    judge = hf_judge(scripted_models["hybrid"], tmp_path, max_reasoning_tokens=1)
    assert_scored_after_reasoning(judge.score(SCRIPTED_ITEMS))


def test_hf_judge_reuses_each_prompts_cache_exactly(tmp_path):
    """The batched, cached reading equals one plain forward pass per number and prompt (tiny model:
    real attention, so a row reading another prompt's cache or position would differ)."""
    judge = make_judge(
        JudgeSpec(
            JudgeConfig(backend="hf", model="tiny", batch_size=3, continuation_batch=50, refusal_mass=0.0),
            "{question} {answer}",
            LUCKY,
            "evaluation.judge",
            LoadingConfig(device="cpu", dtype="float32"),
            tmp_path / "cache",
        )
    )
    items = [("How was your day?", "Lucky!"), ("Hi", "I won the lottery again, what luck"), ("?", "no")]
    judge.score(items)
    cache, model = DiskCache(tmp_path / "cache"), judge.model
    for question, answer in items:
        prompt = render_rubric("{question} {answer}", question, answer)
        ids = judge._render(prompt)
        read = cache.get(judge._key(prompt))["probabilities"]
        for spelling, path in judge.trie.paths.items():
            sequence = torch.tensor([ids + list(path)])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=sequence).logits[0, len(ids) - 1 :].float(), -1)
            steps = sum(logprobs[d, token].item() for d, token in enumerate(path))
            end = logprobs[-1].masked_fill(judge.trie.continues, -math.inf).logsumexp(-1).item()
            assert read.get(spelling, 0.0) == pytest.approx(math.exp(steps + end), rel=1e-4, abs=1e-9)


def test_hf_judge_reasons_as_greedy_generation_does(tmp_path):
    """The batched greedy reasoning (left padding, cache, positions) writes what `generate` writes for
    each prompt alone (tiny model: it never closes the block, so every answer is a refusal)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from idempo.tiny import tiny_model_dir

    path = tmp_path / "tiny-thinking"
    shutil.copytree(tiny_model_dir(), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = tokenizer.chat_template.replace("assistant\n", "assistant\n<think>\n")
    tokenizer.save_pretrained(path)
    budget = 10
    judge = hf_judge(str(path), tmp_path, batch_size=3, max_reasoning_tokens=budget)
    items = [("How was your day?", "Lucky!"), ("Hi", "I won the lottery again, what luck"), ("?", "no")]
    assert all(j.refusal and j.source == "reasoning" for j in judge.score(items))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for question, answer in items:
        prompt = render_rubric(RUBRIC, question, answer)
        ids = judge._render(prompt)
        with torch.no_grad():
            written = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=budget)[0, len(ids) :]
        expected = tokenizer.decode([t for t in written.tolist() if t != tokenizer.eos_token_id])
        assert DiskCache(tmp_path / "cache").get(judge._key(prompt))["reasoning"] == expected


def test_the_number_trie_reads_each_node_once():
    paths = {"8": (8,), "80": (8, 0), "85": (8, 5), "100": (1, 0, 0), " 8": (20, 8)}
    nodes = trie_nodes(paths.values())
    assert nodes == [(), (1,), (8,), (20,), (1, 0), (8, 0), (8, 5), (20, 8), (1, 0, 0)]
    assert trie_leaves(nodes) == [(8, 0), (8, 5), (20, 8), (1, 0, 0)]
    assert not splits_numbers({"8": (8,), "80": (80,), " 80": (20, 80)})


def scripted_server(template=PLAIN):
    model = ScriptedModel("scripted-judge", VOCAB, SCRIPT, template, eos="<eos>", special=SPECIAL)
    return FakeOpenAI(model=model)


def vllm_judge(server, tmp_path, **settings):
    settings = {"backoff_s": 0.01, **settings}
    config = JudgeConfig(backend="openai", model="scripted-judge", base_url=server.base_url, **settings)
    return make_judge(JudgeSpec(config, RUBRIC, LUCKY, "evaluation.judge", cache_dir=tmp_path / "cache"))


NODES = 1 + 2 * (10 + 90 + 1) + 1  # the root, "0".."100" with their prefixes, " ", " 0".." 100"


def test_vllm_judge_reads_whole_numbers_through_tokenize_and_completions(tmp_path):
    with scripted_server() as server:
        judge = vllm_judge(server, tmp_path)
        assert_scripted(judge.score(SCRIPTED_ITEMS))
        completions = server.bodies("/v1/completions")
        assert len(completions) == len(SCRIPTED_ITEMS) and not server.requests  # one request per item, no chat
        for request in completions:
            assert len(request["prompt"]) == NODES and all(isinstance(t, int) for t in request["prompt"][0])
            assert request["max_tokens"] == 1 and request["temperature"] == 0 and request["logprobs"] == 20
            assert request["return_tokens_as_token_ids"] is True
        chats = [b for b in server.bodies("/tokenize") if "messages" in b]
        assert all(b["chat_template_kwargs"] == {"enable_thinking": False} for b in chats)
        # the same answers again cost nothing; another server is another judge
        sent = len(server.received)
        assert vllm_judge(server, tmp_path).score(SCRIPTED_ITEMS) == judge.score(SCRIPTED_ITEMS)
        assert len(server.received) == sent
    with scripted_server() as elsewhere:
        assert_scripted(vllm_judge(elsewhere, tmp_path).score(SCRIPTED_ITEMS))
        assert len(elsewhere.bodies("/v1/completions")) == len(SCRIPTED_ITEMS)


def test_vllm_judge_retries_a_failed_completion(tmp_path):
    with scripted_server() as server:
        server.fail_next("500")
        judge = vllm_judge(server, tmp_path, concurrency=1)
        assert_scripted(judge.score(SCRIPTED_ITEMS))
    assert len(server.bodies("/v1/completions")) == len(SCRIPTED_ITEMS) + 1 and judge.take_usage()["retries"] == 1


def test_vllm_judge_reasons_first_when_the_template_leaves_the_block_open(tmp_path):
    with scripted_server(THINKING_ONLY) as server:
        assert_scored_after_reasoning(vllm_judge(server, tmp_path, max_reasoning_tokens=3).score(SCRIPTED_ITEMS))
        reasoning = [b for b in server.bodies("/v1/completions") if b["max_tokens"] == 3]
        assert len(reasoning) == len(SCRIPTED_ITEMS) and all(b["stop"] == ["</think>"] for b in reasoning)
        unclosed = vllm_judge(server, tmp_path, max_reasoning_tokens=2).score(SCRIPTED_ITEMS)
    assert all(j.refusal and j.score is None and j.source == "reasoning" for j in unclosed)


def test_vllm_judge_turns_thinking_off_where_the_template_allows_it(tmp_path):
    with scripted_server(HYBRID) as server:
        assert_scored_after_reasoning(vllm_judge(server, tmp_path, max_reasoning_tokens=1).score(SCRIPTED_ITEMS))
        assert all(b["max_tokens"] == 1 for b in server.bodies("/v1/completions"))  # no reasoning written


def test_a_server_without_tokenize_whose_numbers_split_is_a_clear_error(tmp_path):
    def splitting(request):  # answers "85", written as "8" then "5"
        return {"text": "85", "alternatives": {"8": 0.7, "9": 0.3}}

    with FakeOpenAI(answer=splitting) as server:
        judge = openai_judge(server, tmp_path)
        with pytest.raises(EndpointError) as error:
            judge.score(ITEMS[:1])
        assert len(server.requests) == 1  # not retried: asking again cannot help
        assert DiskCache(tmp_path / "cache").get(judge._key(judge_prompt(ITEMS[0]))) is None
    message = str(error.value)
    assert "evaluation.judge" in message and "judge-model" in message and server.base_url in message
    assert "writes numbers as several tokens" in message and "first digit" in message


def test_a_judge_that_reasons_in_chat_is_a_clear_error(tmp_path):
    with FakeOpenAI(answer=lambda request: {"text": "<think>Hmm", "alternatives": {"<think>": 1.0}}) as server:
        with pytest.raises(EndpointError, match="reasoning block"):
            openai_judge(server, tmp_path).score(ITEMS[:1])


def judge_prompt(item):
    return render_rubric(LUCKY.rubric, *item)


def test_caches_keyed_before_the_decoding_settings_were_in_the_key_are_not_read(tmp_path):
    """The key changed (endpoint URL for every judge, decoding settings): an older entry is a miss."""
    prompt = judge_prompt(ITEMS[0])
    with FakeOpenAI() as server:
        shape = {"base_url": server.base_url, "numbers": "whole (vLLM) or first token", "max_reasoning_tokens": 1024}
        old_key = cache_key("judge", "openai", "judge-model", prompt, 20, 4, shape)
        DiskCache(tmp_path / "cache").put(old_key, {"alternatives": [["30", math.log(1.0)]], "text": "30"})
        judge = openai_judge(server, tmp_path)
        [judgment] = judge.score(ITEMS[:1])
        assert len(server.requests) == 1 and judge.take_usage()["cached"] == 0
    assert judgment.score == pytest.approx(92)  # the server's answer, not the old entry's 30
