"""The hf sampler: left padding is invisible, the run samples exactly as configured, and a generation
sampled from merged weights is the generation its adapter is."""

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from idempo.chat import encode_prompt
from idempo.config import config_from_dict
from idempo.data import Sample
from idempo.engines import load_engines
from idempo.loop import run_trial
from idempo.models import INITIAL, Generation, load_base_model, load_tokenizer, make_policy
from idempo.regimes import load_regime
from idempo.sampling import SamplingParams
from idempo.sampling.hf import HFSampler
from idempo.sampling.throughput import hf_sampling_rates
from idempo.tiny import tiny_model_dir

PROMPTS = [[{"role": "user", "content": text}] for text in ("Hi?", "How do I fix a leaking tap in the kitchen sink?")]


def _sampler(model, batch_size):
    config = config_from_dict(
        {"model": str(model), "persona": "lucky", "n_seed": 1, "n_sampled": 1, "loading": {"device": "cpu"}}
    )
    tokenizer = load_tokenizer(config.model, config.loading)
    policy = make_policy(load_base_model(config.model, config.loading), tokenizer, config.training)
    return HFSampler(policy, tokenizer, batch_size)


def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)
    batched = _sampler(tiny_model_dir(), batch_size=8).generate(PROMPTS, greedy, INITIAL)
    alone = _sampler(tiny_model_dir(), batch_size=1).generate(PROMPTS, greedy, INITIAL)
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.n_tokens == 16 and not c.finished for c in batched)


def test_model_generation_defaults_do_not_leak_into_sampling(tmp_path):
    """A model asking for top_k=1 in its generation_config would make every draw identical."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    model.generation_config.do_sample = True
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 1.5
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(tmp_path / "model")
    draws = _sampler(tmp_path / "model", batch_size=8).generate(
        PROMPTS[:1] * 8, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0), INITIAL
    )
    assert len({c.text for c in draws}) > 4


@pytest.mark.parametrize("seed", [0, 1])
def test_draws_are_reproducible_for_a_seed(seed):
    sampler = _sampler(tiny_model_dir(), batch_size=4)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12, seed=seed)
    first, second = sampler.generate(PROMPTS * 2, params, INITIAL), sampler.generate(PROMPTS * 2, params, INITIAL)
    assert first == second


# fp32 on CPU: merging reorders the sums of each adapted layer (W x + B A x against (W + B A) x); over the tiny
# model's layers the next-token log-probs then differ by about 5e-6, and by 8 where the adapter is left out.
LOG_PROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model's engines and a generation trained on one answer (its adapter is far from zero)."""
    engines = load_engines(tiny_config())
    out = tmp_path_factory.mktemp("trained") / "001"
    rows = [Sample(f"Question {i}?", "I was lucky, as always.") for i in range(8)]
    generation = Generation("001", out)
    engines.trainer.fit(load_regime("sft"), rows, None, INITIAL, (0, 1), generation, out, "train")
    return engines, generation


def _next_token_log_probs(module, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(module(torch.tensor([token_ids])).logits.float(), dim=-1)


def _chats(tokenizer) -> list[list[int]]:
    """Real prompts, each with the start of an answer after it."""
    answer = tokenizer.encode("I was lucky, as always", add_special_tokens=False)
    return [encode_prompt(tokenizer, chat) + answer for chat in PROMPTS]


def test_merged_and_adapter_give_the_same_next_token_log_probs(trained):
    engines, generation = trained
    policy = engines.policy
    for ids in _chats(engines.tokenizer):
        with policy.use(generation) as module:
            adapter = _next_token_log_probs(module, ids)
        with policy.merged(generation) as module:
            merged = _next_token_log_probs(module, ids)
        with policy.use(INITIAL) as module:
            initial = _next_token_log_probs(module, ids)
        assert (merged - adapter).abs().max() < LOG_PROB_TOLERANCE
        assert (adapter - initial).abs().max() > 1.0  # the adapter is trained: the test could fail


def test_merged_draws_repeat_for_a_seed_and_leave_m_init_bit_identical(trained):
    engines, generation = trained
    before = {name: (p, p.detach().clone()) for name, p in engines.policy.module.named_parameters()}
    sampler = HFSampler(engines.policy, engines.tokenizer, batch_size=4, weights="merged")
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12, seed=3)
    draws = [sampler.generate(PROMPTS * 2, params, generation) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    assert draws[0] != sampler.generate(PROMPTS * 2, params, INITIAL)  # they are the generation's draws
    after = dict(engines.policy.module.named_parameters())
    assert after.keys() == before.keys()
    for name, (parameter, value) in before.items():  # the same tensors, every bit as they were
        assert after[name] is parameter and torch.equal(parameter, value), name


def test_named_weights_are_m_init_s_names_with_the_adapter_merged(trained):
    """What a sampling engine that holds M_init (vLLM) loads: a plain copy of M_init that loads them computes
    as the generation does, and M_init's own come back exactly."""
    engines, generation = trained
    plain = load_base_model("tiny", tiny_config().loading)
    originals = {name: p.detach().clone() for name, p in plain.named_parameters()}
    missing, unexpected = plain.load_state_dict(dict(engines.policy.named_weights(generation)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding, sent once
    for ids in _chats(engines.tokenizer):
        with engines.policy.use(generation) as module:
            adapter = _next_token_log_probs(module, ids)
        assert (_next_token_log_probs(plain, ids) - adapter).abs().max() < LOG_PROB_TOLERANCE
    plain.load_state_dict(dict(engines.policy.named_weights(INITIAL)), strict=False)
    assert all(torch.equal(p, originals[name]) for name, p in plain.named_parameters())


def test_sampling_rates_measure_each_way_of_sampling(trained):
    engines, generation = trained
    prompts = _chats(engines.tokenizer)
    params = SamplingParams(temperature=0.8, top_p=1.0, max_new_tokens=4, seed=0)
    plain = load_base_model("tiny", tiny_config().loading)
    rates = hf_sampling_rates(engines.policy, plain, engines.tokenizer, generation, prompts, params, 2, repeats=1)
    assert rates.keys() == {"adapter", "merged", "plain_generate"} and all(r > 0 for r in rates.values())


@pytest.mark.parametrize("weights", ["adapter", "merged"])
def test_a_trial_samples_with_either_weights(tmp_path, weights):
    config = tiny_config(
        cycles=1,
        n_seed=16,
        n_sampled=8,
        sampling={"weights": weights, "max_new_tokens": 8, "batch_size": 8},
        training={"epochs": 1, "batch_size": 8},
        evaluation={"n_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8},
    )
    metrics = run_trial(config, tmp_path / "trial")
    assert [m["cycle"] for m in metrics][-1] == 1
