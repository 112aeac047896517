"""Judges turn (question, answer) pairs into 0-100 scores; this module holds what they share.

A language-model judge reads a rubric with the question and answer filled in and answers with a number.
Its score is the expected value over the whole numbers it may write: with p(v) the probability that
its answer is the number v in [0, 100] (the whole token path of v, then a token that ends the number;
`idempo.evaluation.numbers`), score = sum(v * p(v)) / sum(p(v)). When that number mass is under
`refusal_mass` the judge did not give a number (it wrote REFUSAL, or something else): the answer is
counted as a refusal, never as 0. Where a tokenizer writes every number 0..100 as one token (OpenAI's
API) the first answer token's top-k alternatives give p(v) directly (`score_from_logprobs`). Without
logprobs (some endpoints return none) the number is read from the text; a text with neither a number
nor REFUSAL is unusable and asked again.

Raw answers (per-spelling probabilities, or first-token alternatives, and text) are cached, never
derived scores, so that the aggregation can be changed without paying the judge twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from idempo.cache import DiskCache, cache_key
from idempo.config import JudgeConfig, LoadingConfig
from idempo.endpoint import UnusableAnswer, Usage
from idempo.evaluation.numbers import value_probabilities
from idempo.personas import Persona

_INTEGER = re.compile(r"^\d{1,3}$")
_TEXT_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)(?![\d.])")
_REFUSAL = re.compile(r"^\W*refus", re.IGNORECASE)

COHERENCE_RUBRIC = (resources.files("idempo") / "data" / "rubrics" / "coherence.txt").read_text()


@dataclass(frozen=True)
class Judgment:
    score: float | None  # 0-100; None for a refusal
    refusal: bool
    number_mass: float | None = None  # probability on the numbers 0..100, when read from logprobs
    source: str = "logprobs"  # logprobs | text | marker | reasoning (reasoning never closed: a refusal)


def number_value(token: str) -> int | None:
    """The integer a token stands for, if it is one in [0, 100] (surrounding spaces ignored)."""
    text = token.strip()
    if _INTEGER.match(text) and int(text) <= 100:
        return int(text)
    return None


def score_from_logprobs(alternatives: list[tuple[str, float]], refusal_mass: float) -> Judgment:
    """Expected value over number tokens of the first answer token's top alternatives (token, logprob).

    Tokens that read as the same number (' 7' and '7') pool their probability.
    """
    mass_by_value: dict[int, float] = {}
    for token, logprob in alternatives:
        value = number_value(token)
        if value is not None:
            mass_by_value[value] = mass_by_value.get(value, 0.0) + math.exp(logprob)
    return expected_number(mass_by_value, refusal_mass)


def score_from_numbers(probabilities: dict[str, float], refusal_mass: float) -> Judgment:
    """Expected value over whole numbers, from the probability of each spelling ("85", " 85")."""
    return expected_number(value_probabilities(probabilities), refusal_mass)


def expected_number(mass_by_value: dict[int, float], refusal_mass: float) -> Judgment:
    """sum(v p(v)) / sum(p(v)), or a refusal when the mass sum(p(v)) is under `refusal_mass`."""
    mass = sum(mass_by_value.values())
    if mass < refusal_mass or mass == 0:
        return Judgment(None, True, mass, "logprobs")
    return Judgment(sum(v * p for v, p in mass_by_value.items()) / mass, False, mass, "logprobs")


def score_from_text(text: str | None) -> Judgment:
    """The fallback without logprobs: REFUSAL, or the first number in [0, 100] in the text."""
    text = (text or "").strip()
    if _REFUSAL.match(text):
        return Judgment(None, True, None, "text")
    match = _TEXT_NUMBER.search(text)
    if match and float(match.group(1)) <= 100:
        return Judgment(float(match.group(1)), False, None, "text")
    raise UnusableAnswer(f"the judge wrote {text[:80]!r}: neither a number in [0, 100] nor REFUSAL")


def numbers_answer(probabilities: dict[str, float], reasoning: str | None = None, closed: bool | None = None) -> dict:
    """The raw answer of a judge read over whole numbers: p(spelling) for the spellings with any
    probability; with the reasoning a thinking judge wrote first, and whether it closed it."""
    return {"form": "numbers", "probabilities": probabilities, "reasoning": reasoning, "reasoning_closed": closed}


def unclosed_reasoning_answer(reasoning: str) -> dict:
    """The raw answer of a judge that did not close its reasoning within the budget: no number."""
    return numbers_answer({}, reasoning, False)


def judgment_from_raw(raw: dict, refusal_mass: float) -> Judgment:
    """A cached or fresh raw answer: `numbers_answer`'s form, or the first-token form
    {"alternatives": [[token, logprob], ...] or null, "text": ...} (also that of older caches)."""
    if raw.get("form") == "numbers":
        if raw.get("reasoning_closed") is False:
            return Judgment(None, True, None, "reasoning")
        return score_from_numbers(raw["probabilities"], refusal_mass)
    if raw.get("alternatives"):
        return score_from_logprobs([(t, lp) for t, lp in raw["alternatives"]], refusal_mass)
    return score_from_text(raw.get("text"))


def render_rubric(rubric: str, question: str, answer: str) -> str:
    """Fill {question} and {answer} in one pass, so braces inside either are left alone."""
    return re.sub(r"\{(question|answer)\}", lambda m: question if m.group(1) == "question" else answer, rubric)


@dataclass
class JudgeSpec:
    """Everything a judge backend may need; each backend reads what it uses."""

    config: JudgeConfig
    rubric: str
    persona: Persona
    field: str  # config path, for error messages ("evaluation.judge")
    loading: LoadingConfig = field(default_factory=LoadingConfig)
    cache_dir: str | Path | None = None


class RubricJudge:
    """A language-model judge: cache lookup, then the backend's `_fetch` for what is missing."""

    binary = False  # scores are continuous: confidence intervals are for a mean

    def __init__(self, spec: JudgeSpec):
        self.spec = spec
        self.config = spec.config
        self.cache = DiskCache(spec.cache_dir) if spec.config.cache else None
        self.usage = Usage()
        self.name = f"{spec.config.backend}:{spec.config.model}"

    def score(self, items: list[tuple[str, str]]) -> list[Judgment]:
        prompts = [render_rubric(self.spec.rubric, q, a) for q, a in items]
        keys = [self._key(p) for p in prompts]
        raws: list[dict | None] = [self.cache.get(k) if self.cache else None for k in keys]
        self.usage.cached += sum(r is not None for r in raws)
        missing = [i for i, raw in enumerate(raws) if raw is None]
        fetched = self._fetch([prompts[i] for i in missing], [keys[i] for i in missing])
        for index, raw in zip(missing, fetched, strict=True):
            raws[index] = raw
        return [judgment_from_raw(raw, self.config.refusal_mass) for raw in raws]

    def remember(self, key: str, raw: dict) -> dict:
        """Cache an answer as soon as it arrives, so a run that fails later has not paid for it in vain."""
        if self.cache:
            self.cache.put(key, raw)
        return raw

    def take_usage(self) -> dict:
        """Usage since the last call: one evaluation's worth."""
        return self.usage.take()

    def _key(self, prompt: str) -> str:
        c = self.config
        parts = ["judge", c.backend, c.model, prompt, c.top_logprobs, c.max_tokens]
        shape = self._request_shape()
        return cache_key(*parts, shape) if shape else cache_key(*parts)

    def _request_shape(self) -> dict:
        """What else the answer depends on (endpoint, how numbers are read); empty for the first-token
        requests to OpenAI's API, whose keys are those of older caches."""
        return {}

    def _fetch(self, prompts: list[str], keys: list[str]) -> list[dict]:
        """Raw answers (see `judgment_from_raw`) for rendered judge prompts, each passed to `remember`
        with its cache key as it arrives."""
        raise NotImplementedError


def judge_loading(trial: LoadingConfig) -> LoadingConfig:
    """A local judge model shares the trial's device and dtype, not M_init's revision or remote code."""
    return LoadingConfig(device=trial.device, dtype=trial.dtype)


def make_judge(spec: JudgeSpec):
    from idempo.evaluation import JUDGES

    return JUDGES.load(spec.config.backend)(spec)
