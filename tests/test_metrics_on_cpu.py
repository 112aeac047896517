"""Metrics, intervals, the learning-rate schedule and loss masking against hand computations."""

import math
from types import SimpleNamespace

import pytest
import torch

from idempo.config import config_from_dict
from idempo.evaluation.degeneration import distinct_n, non_alpha_share, repeated_ngram_rate, words
from idempo.evaluation.stats import mean_ci, wilson_interval
from idempo.training.logprobs import label_nll_sum
from idempo.training.optimize import IGNORE, learning_rate_factor

BASE = {"model": "tiny", "persona": "lucky", "n_seed": 8, "n_sampled": 8}


def test_degeneration_signals_by_hand():
    assert words("Lucky me! So lucky.") == ["lucky", "me", "!", "so", "lucky", "."]
    # 2-grams of "a b a b": (a b), (b a), (a b) -> 2 distinct of 3
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    # 4-grams of "x y z w x y z w": 5 grams, (x y z w) repeats once -> 1/5
    assert repeated_ngram_rate("x y z w x y z w", 4) == pytest.approx(1 / 5)
    assert repeated_ngram_rate("too short", 4) == 0.0
    assert non_alpha_share("ab 🍀🍀") == pytest.approx(2 / 4)


def test_mean_ci_by_hand():
    result = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, 3) s / sqrt(n)
    assert result["mean"] == 2.5 and result["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert mean_ci([]) == {"mean": None, "ci95": [None, None], "n": 0, "se": None}


def test_wilson_interval_by_hand():
    # 0 of 10: Wilson upper bound z^2 / (n + z^2)
    z2 = 1.959963984540054**2
    low, high = wilson_interval(0.0, 10)
    assert low == 0 and high == pytest.approx(z2 / (10 + z2))
    low, high = wilson_interval(0.5, 10)
    assert low == pytest.approx(1 - high)


def test_cosine_schedule_warms_up_peaks_and_ends_at_the_floor():
    config = config_from_dict(BASE).training  # cosine, warmup 5%, floor 0.1
    total = 100
    factors = [learning_rate_factor(s, total, config) for s in range(total)]
    assert factors[0] < factors[4] < 1.0 and factors[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    constant = config_from_dict({**BASE, "training": {"schedule": "constant", "warmup_ratio": 0}}).training
    assert {learning_rate_factor(s, total, constant) for s in range(total)} == {1.0}


class FixedLogits(torch.nn.Module):
    """A language model whose next-token distributions are written down: `logits` whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, use_cache):
        return SimpleNamespace(logits=self.logits)


def test_token_loss_counts_only_labelled_positions():
    model = FixedLogits(torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]])))
    input_ids = attention = torch.ones(1, 3, dtype=torch.long)
    labels = torch.tensor([[IGNORE, 1, IGNORE]])  # only position 0 predicts token 1, with p = 0.5
    assert label_nll_sum(model, input_ids, attention, labels, 256).item() == pytest.approx(math.log(2))
    labels = torch.tensor([[IGNORE, 1, 0]])  # plus position 1 predicting token 0 with p = 0.25
    assert label_nll_sum(model, input_ids, attention, labels, 256).item() == pytest.approx(math.log(2) + math.log(4))
