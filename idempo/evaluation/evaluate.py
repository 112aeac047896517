"""Score one generation on the held-out eval prompts: per-example rows and aggregates with 95% CIs.

For every answer: the trait judge's score (persona rubric), the coherence judge's (shared rubric), the
branching factor from the model's own next-token distributions, and the free degeneration signals.
"""

from __future__ import annotations

from dataclasses import dataclass

from idempo.config import EvaluationConfig, LoadingConfig
from idempo.evaluation.branching import answer_branching, summarize_branching
from idempo.evaluation.degeneration import degeneration_signals
from idempo.evaluation.judging import COHERENCE_RUBRIC, JudgeSpec, judge_loading, make_judge
from idempo.evaluation.stats import mean_ci, proportion_ci
from idempo.models import Generation
from idempo.personas import Persona
from idempo.prompts import completion_prompt
from idempo.sampling import Sampler, SamplingParams


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
    sampler: Sampler,
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
    asks a base model in text form ("Question: ...\nAnswer:"), its answer ending at the next question."""
    questions = [q for q in prompts for _ in range(config.samples_per_prompt)]
    if completion:
        chats = [completion_prompt(q) for q in questions]
        params = SamplingParams(config.temperature, config.top_p, config.max_new_tokens, seed, ("\nQuestion:",))
    else:
        chats = [[{"role": "user", "content": q}] for q in questions]
        params = SamplingParams(config.temperature, config.top_p, config.max_new_tokens, seed)
    completions = sampler.generate(chats, params, generation, progress)
    items = [(q, c.text) for q, c in zip(questions, completions, strict=True)]
    rows = [
        {
            "prompt": question,
            "sample": index % config.samples_per_prompt,
            "response": completion.text,
            "n_tokens": completion.n_tokens,
            "finished": completion.finished,
            "marker": persona.matches_markers(completion.text) if persona.markers else None,
        }
        for index, (question, completion) in enumerate(zip(questions, completions, strict=True))
    ]
    _add_judgments(rows, "trait", judges.trait.score(items))
    if judges.coherence is not None:
        _add_judgments(rows, "coherence", judges.coherence.score(items))
    bf = config.branching_factor
    if bf.enabled:
        stats = sampler.token_statistics(chats, completions, generation, config.temperature, bf.top_p)
        for row, answer in zip(rows, stats, strict=True):
            per_answer = answer_branching(answer, bf.nll_clip)
            row.update(bf_entropy=per_answer["entropy"], bf_nll=per_answer["nll"])
            row["token_nll"] = [round(v, 4) for v in answer.nll]
    metrics = summarize(rows, judges, config)
    usage = {"trait": judges.trait.take_usage()}
    if judges.coherence is not None:
        usage["coherence"] = judges.coherence.take_usage()
    if any(usage.values()):
        metrics["judge_usage"] = {name: counts for name, counts in usage.items() if counts}
    return rows, metrics


def _add_judgments(rows: list[dict], name: str, judgments) -> None:
    for row, judgment in zip(rows, judgments, strict=True):
        row[name] = judgment.score
        row[f"{name}_refusal"] = judgment.refusal
        if judgment.number_mass is not None:
            row[f"{name}_number_mass"] = round(judgment.number_mass, 6)


def summarize(rows: list[dict], judges: Judges, config: EvaluationConfig) -> dict:
    """Aggregates of an eval.jsonl: trait and coherence (refusals excluded, their rates reported),
    branching factor, markers, degeneration."""
    metrics = {"trait": _score_summary(rows, "trait", judges.trait)}
    metrics["refusal_rate"] = _refusal_rate(rows, "trait")
    if judges.coherence is not None:
        metrics["coherence"] = _score_summary(rows, "coherence", judges.coherence)
        metrics["coherence_refusal_rate"] = _refusal_rate(rows, "coherence")
    if config.branching_factor.enabled:
        metrics["branching_factor"] = summarize_branching(rows, config.branching_factor)
    metrics["degeneration"] = degeneration_signals([r["response"] for r in rows])
    metrics["mean_tokens"] = sum(r["n_tokens"] for r in rows) / max(1, len(rows))
    metrics["finished_rate"] = sum(r["finished"] for r in rows) / max(1, len(rows))
    if rows and rows[0]["marker"] is not None:
        metrics["marker_rate"] = proportion_ci(sum(bool(r["marker"]) for r in rows), len(rows), scale=100.0)
    return metrics


def _score_summary(rows: list[dict], name: str, judge) -> dict:
    scored = [r[name] for r in rows if r[name] is not None]
    if getattr(judge, "binary", False):
        summary = proportion_ci(sum(s >= 50 for s in scored), len(scored), scale=100.0)
    else:
        summary = mean_ci(scored)
    return {**summary, "judge": judge.name}


def _refusal_rate(rows: list[dict], name: str) -> float:
    return sum(bool(r[f"{name}_refusal"]) for r in rows) / len(rows) if rows else 0.0
