"""The hf sampler: left padding is invisible, and the run samples exactly as configured."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from idempo.config import config_from_dict
from idempo.models import INITIAL, load_base_model, load_tokenizer, make_policy
from idempo.sampling import SamplingParams
from idempo.sampling.hf import HFSampler
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
