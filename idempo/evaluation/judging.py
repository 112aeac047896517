"""Judges turn (question, answer) pairs into 0-100 scores; this module holds what they share.

A judge's score is the expected value over the whole numbers 0..100 it may answer with; an answer with
less than `refusal_mass` probability on numbers is a refusal, never a 0. Without logprobs the number is
read from the text; a text with neither a number nor REFUSAL is asked again. Raw answers are cached, never
scores, so that the aggregation can change without paying the judge twice; only settled answers are kept
(`worth_keeping`). docs/metrics.md, "Trait score and coherence", holds the formula, the cache key and
why a judge over `max_refusal_rate` is broken, not strict (`check_refusal_rate`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from idempo.cache import DiskCache, cache_key
from idempo.config import JudgeConfig, LoadingConfig
from idempo.endpoint import UnusableAnswer, Usage
from idempo.evaluation.numbers import value_probabilities
from idempo.personas import Persona
from idempo.redaction import redact

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
    raw: dict | None = field(default=None, compare=False, repr=False)  # the judge's raw answer, to show


class TooManyRefusals(RuntimeError):
    """A judge refused more of a set of answers than its `max_refusal_rate` allows."""


def number_value(token: str) -> int | None:
    """The integer a token stands for, if it is one in [0, 100] (surrounding spaces ignored)."""
    text = token.strip()
    if _INTEGER.match(text) and int(text) <= 100:
        return int(text)
    return None


def score_from_logprobs(alternatives: list[tuple[str, float]], refusal_mass: float) -> Judgment:
    """Expected value over number tokens of the first answer token's top alternatives (token, logprob);
    tokens that read as the same number (' 7' and '7') pool their probability."""
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
    {"alternatives": [[token, logprob], ...] or null, "text": ...}."""
    if raw.get("form") == "numbers":
        if raw.get("reasoning_closed") is False:
            judgment = Judgment(None, True, None, "reasoning")
        else:
            judgment = score_from_numbers(raw["probabilities"], refusal_mass)
    elif raw.get("alternatives"):
        judgment = score_from_logprobs([(t, lp) for t, lp in raw["alternatives"]], refusal_mass)
    else:
        judgment = score_from_text(raw.get("text"))
    return replace(judgment, raw=raw)


def worth_keeping(raw: dict) -> bool:
    """Whether a raw answer may be cached for good: it puts some probability on a number (its score,
    or a refusal under a larger `refusal_mass`, is read from it on every read), the judge wrote
    REFUSAL, or it reasoned past `max_reasoning_tokens` (part of the key: asking again writes the same).
    An answer with no number at all is never cached: it may be a transient failure."""
    try:
        judgment = judgment_from_raw(raw, refusal_mass=0.0)  # any probability on a number gives a score
    except UnusableAnswer:
        return False
    wrote_refusal = bool(_REFUSAL.match((raw.get("text") or "").strip()))
    return not judgment.refusal or judgment.source == "reasoning" or wrote_refusal


def check_refusal_rate(judgments: list[Judgment], config: JudgeConfig, where: str) -> None:
    """Fail when more than `config.max_refusal_rate` of the judgments are refusals: a judge that gives
    (nearly) no number is misconfigured (model, chat template, rubric, endpoint), and its trait would
    be reported as null. `where` names the judge's config field, e.g. 'evaluation.judge'."""
    refused = [j for j in judgments if j.refusal]
    if not judgments or len(refused) / len(judgments) <= config.max_refusal_rate:
        return
    rate = len(refused) / len(judgments)
    example = next((j.raw for j in refused if j.raw is not None), None)
    shown = f"; one of its raw answers: {show_raw(example)}" if example is not None else ""
    raise TooManyRefusals(
        f"{where} ({config.backend}:{config.model}): {len(refused)} of {len(judgments)} answers were refusals "
        f"(a rate of {rate:.2f}), above {where}.max_refusal_rate = {config.max_refusal_rate:g}: the judge gives no "
        f"usable number{shown}. Check the judge's model, endpoint and rubric, or set {where}.max_refusal_rate "
        "to 1 to accept its refusals"
    )


def show_raw(raw: dict, limit: int = 200) -> str:
    """A raw answer in a line: its text (or reasoning) cut to `limit` characters, its top first-token
    alternatives or its probability on numbers; key-like text redacted."""
    parts = []
    if raw.get("form") == "numbers":
        reasoning = raw.get("reasoning")
        if raw.get("reasoning_closed") is False:
            parts.append(f"reasoning not closed within max_reasoning_tokens: {_cut(reasoning or '', limit)!r}")
        elif reasoning:
            parts.append(f"reasoning {_cut(reasoning, limit)!r}")
        mass = sum(value_probabilities(raw.get("probabilities") or {}).values())
        parts.append(f"probability on the numbers 0..100: {mass:.3g}")
    else:
        parts.append(f"text {_cut(raw.get('text') or '', limit)!r}")
        top = sorted(raw.get("alternatives") or [], key=lambda alternative: -alternative[1])[:5]
        if top:
            parts.append("first tokens " + ", ".join(f"{token!r} p={math.exp(lp):.2f}" for token, lp in top))
    return redact("; ".join(parts))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


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
        """Cache a settled answer (`worth_keeping`) as soon as it arrives, so a run that fails later has
        not paid for it in vain."""
        if self.cache and worth_keeping(raw):
            self.cache.put(key, raw)
        return raw

    def take_usage(self) -> dict:
        """Usage since the last call: one evaluation's worth."""
        return self.usage.take()

    def _key(self, prompt: str) -> str:
        return cache_key("judge", self.config.backend, self.config.model, prompt, self._answer_settings())

    def _answer_settings(self) -> dict:
        """Everything else the answer depends on: the endpoint, how numbers are read, the decoding."""
        raise NotImplementedError

    def _fetch(self, prompts: list[str], keys: list[str]) -> list[dict]:
        """Raw answers (see `judgment_from_raw`) for rendered judge prompts, each passed to `remember`
        with its cache key as it arrives."""
        raise NotImplementedError


def judge_loading(trial: LoadingConfig) -> LoadingConfig:
    """A local judge model shares the trial's device and dtype, not M_init's revision or remote code."""
    return LoadingConfig(device=trial.device, dtype=trial.dtype)


def make_judge(spec: JudgeSpec):
    from idempo.registry import JUDGES

    return JUDGES.load(spec.config.backend)(spec)
