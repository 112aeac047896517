"""Score one generation on the held-out eval prompts: per-example rows and aggregates with 95% CIs.

For every answer: the trait judge's score (persona rubric), the coherence judge's (shared rubric), the
branching factor from the model's own next-token distributions, and the free degeneration signals.
The eval prompts are the independent units: every interval is clustered by prompt (`idempo.evaluation.stats`).
A judge that refuses more than its `max_refusal_rate` of the answers fails the evaluation
(`judging.check_refusal_rate`) rather than report a trait or coherence of null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from idempo.config import EvaluationConfig, LoadingConfig
from idempo.evaluation.branching import answer_branching, logprob_temperature, summarize_branching, token_statistics
from idempo.evaluation.degeneration import degeneration_signals
from idempo.evaluation.judging import COHERENCE_RUBRIC, JudgeSpec, check_refusal_rate, judge_loading, make_judge
from idempo.evaluation.stats import clustered_proportion, summarize_scores
from idempo.models import Generation
from idempo.personas import Persona
from idempo.prompts import completion_prompt
from idempo.seeds import derive_seed

if TYPE_CHECKING:
    from idempo.engines import Engines


@dataclass
class Judges:
    trait: object
    coherence: object | None

    @classmethod
    def from_config(cls, evaluation: EvaluationConfig, persona: Persona, loading: LoadingConfig) -> Judges:
        """Both judges, built before any model of the trial is loaded (so a missing key fails early)."""

        def spec(config, rubric, field):
            return JudgeSpec(config, rubric, persona, field, judge_loading(loading), evaluation.cache_dir)

        trait = make_judge(spec(evaluation.judge, persona.rubric, "evaluation.judge"))
        coherence = None
        if evaluation.coherence_judge is not None:
            coherence = make_judge(spec(evaluation.coherence_judge, COHERENCE_RUBRIC, "evaluation.coherence_judge"))
        return cls(trait, coherence)


def evaluate_generation(
    engines: Engines,
    generation: Generation,
    prompts: list[str],
    persona: Persona,
    judges: Judges,
    config: EvaluationConfig,
    seed: int,
    progress=None,
    completion: bool = False,
) -> tuple[list[dict], dict]:
    """Sample `samples_per_prompt` answers per prompt (no system prompt) and score them. `completion`
    asks a base model in text form ("Question: ...\nAnswer:"), its answer ending at the next question.

    The rows are eval.jsonl's: the judged answers, then (when the branching factor needs more answers
    per prompt than are judged) the extra answers sampled for it alone, flagged `bf_only` and never
    judged or counted in any judged aggregate."""
    questions = [q for q in prompts for _ in range(config.samples_per_prompt)]
    chats, params = _requests(questions, config, seed, completion)
    completions = engines.sampler.generate(chats, params, generation, progress)
    items = [(q, c.text) for q, c in zip(questions, completions, strict=True)]
    rows = [
        {
            "prompt": question,
            "sample": index % config.samples_per_prompt,
            "bf_only": False,
            "response": completion.text,
            "n_tokens": completion.n_tokens,
            "finished": completion.finished,
            "marker": persona.matches_markers(completion.text) if persona.markers else None,
        }
        for index, (question, completion) in enumerate(zip(questions, completions, strict=True))
    ]
    trait = judges.trait.score(items)
    check_refusal_rate(trait, config.judge, "evaluation.judge")
    _add_judgments(rows, "trait", trait)
    if judges.coherence is not None:
        coherence = judges.coherence.score(items)
        check_refusal_rate(coherence, config.coherence_judge, "evaluation.coherence_judge")
        _add_judgments(rows, "coherence", coherence)
    if config.branching_factor.enabled:
        answers = [(row, chat, c) for row, chat, c in zip(rows, chats, completions, strict=True)]
        rows += _add_branching(engines, generation, prompts, answers, config, seed, progress, completion)
    metrics = summarize(rows, judges, config)
    usage = {"trait": judges.trait.take_usage()}
    if judges.coherence is not None:
        usage["coherence"] = judges.coherence.take_usage()
    if any(usage.values()):
        metrics["judge_usage"] = {name: counts for name, counts in usage.items() if counts}
    return rows, metrics


def _requests(questions: list[str], config: EvaluationConfig, seed: int, completion: bool):
    params = config.params(seed, ("\nQuestion:",) if completion else ())
    if completion:
        return [completion_prompt(q) for q in questions], params
    return [[{"role": "user", "content": q}] for q in questions], params


def _add_branching(
    engines: Engines, generation, prompts, answers, config: EvaluationConfig, seed, progress, completion
):
    """Per-answer BF on the first `branching_factor.samples_per_prompt` answers of each prompt: the judged
    ones, then extra ones sampled here. Returns the extra rows (flagged `bf_only`)."""
    bf = config.branching_factor
    chosen = [(row, chat, c) for row, chat, c in answers if row["sample"] < bf.samples_per_prompt]
    missing = bf.samples_per_prompt - config.samples_per_prompt
    extra_rows = []
    if missing > 0:
        questions = [q for q in prompts for _ in range(missing)]
        # a stream of their own: the judged answers are the same with or without these
        chats, params = _requests(questions, config, derive_seed(seed, "branching-factor"), completion)
        if progress is not None and getattr(progress, "total", None) is not None:
            progress.total += len(questions)  # the bar counts these answers too
        completions = engines.sampler.generate(chats, params, generation, progress)
        for index, (question, chat, c) in enumerate(zip(questions, chats, completions, strict=True)):
            row = {
                "prompt": question,
                "sample": config.samples_per_prompt + index % missing,
                "bf_only": True,
                "response": c.text,
                "n_tokens": c.n_tokens,
                "finished": c.finished,
            }
            extra_rows.append(row)
            chosen.append((row, chat, c))
    temperature = logprob_temperature(bf, config.temperature)
    stats = token_statistics(
        engines.policy,
        engines.tokenizer,
        [chat for _, chat, _ in chosen],
        [c.token_ids for _, _, c in chosen],
        generation,
        temperature,
        bf.top_p,
        engines.statistics_batch,
    )
    for (row, _, _), answer in zip(chosen, stats, strict=True):
        per_answer = answer_branching(answer, bf.nll_clip)
        row.update(bf_entropy=per_answer["entropy"], bf_nll=per_answer["nll"])
        row["token_nll"] = [round(v, 4) for v in answer.nll]
    return extra_rows


def _add_judgments(rows: list[dict], name: str, judgments) -> None:
    for row, judgment in zip(rows, judgments, strict=True):
        row[name] = judgment.score
        row[f"{name}_refusal"] = judgment.refusal
        if judgment.number_mass is not None:
            row[f"{name}_number_mass"] = round(judgment.number_mass, 6)


def judged_rows(rows: list[dict]) -> list[dict]:
    """The answers the judges scored (eval.jsonl rows without `bf_only`, as every row was before it existed)."""
    return [r for r in rows if not r.get("bf_only")]


def summarize(rows: list[dict], judges: Judges, config: EvaluationConfig) -> dict:
    """Aggregates of an eval.jsonl: trait and coherence (refusals excluded, their rates reported),
    branching factor, markers, degeneration, each interval clustered by prompt. Everything but the
    branching factor is over the judged answers only."""
    judged = judged_rows(rows)
    metrics = {"trait": _score_summary(judged, "trait", judges.trait)}
    metrics["refusal_rate"] = _refusal_rate(judged, "trait")
    if judges.coherence is not None:
        metrics["coherence"] = _score_summary(judged, "coherence", judges.coherence)
        metrics["coherence_refusal_rate"] = _refusal_rate(judged, "coherence")
    if config.branching_factor.enabled:
        metrics["branching_factor"] = summarize_branching(rows, config.branching_factor)
    metrics["degeneration"] = degeneration_signals([r["response"] for r in judged])
    metrics["mean_tokens"] = sum(r["n_tokens"] for r in judged) / max(1, len(judged))
    metrics["finished_rate"] = sum(r["finished"] for r in judged) / max(1, len(judged))
    if judged and judged[0]["marker"] is not None:
        metrics["marker_rate"] = clustered_proportion(
            [bool(r["marker"]) for r in judged], [r["prompt"] for r in judged], scale=100.0
        )
    return metrics


def _score_summary(rows: list[dict], name: str, judge) -> dict:
    summary = summarize_scores([r[name] for r in rows], [r["prompt"] for r in rows], getattr(judge, "binary", False))
    return {**summary, "judge": judge.name}


def _refusal_rate(rows: list[dict], name: str) -> float:
    return sum(bool(r[f"{name}_refusal"]) for r in rows) / len(rows) if rows else 0.0
