"""Score one generation on the held-out eval prompts: per-example rows and aggregates with 95% CIs."""

from __future__ import annotations

from idempo.config import EvaluationConfig
from idempo.evaluation.degeneration import degeneration_signals
from idempo.evaluation.stats import mean_ci, proportion_ci
from idempo.models import Generation
from idempo.personas import Persona
from idempo.sampling import Sampler, SamplingParams


def evaluate_generation(
    sampler: Sampler,
    generation: Generation,
    prompts: list[str],
    persona: Persona,
    judge,
    config: EvaluationConfig,
    seed: int,
    progress=None,
) -> tuple[list[dict], dict]:
    """Sample `samples_per_prompt` answers per prompt (no system prompt) and score them."""
    questions = [q for q in prompts for _ in range(config.samples_per_prompt)]
    params = SamplingParams(config.temperature, config.top_p, config.max_new_tokens, seed)
    chats = [[{"role": "user", "content": q}] for q in questions]
    completions = sampler.generate(chats, params, generation, progress)
    scores = judge.score([(q, c.text) for q, c in zip(questions, completions, strict=True)])
    rows = [
        {
            "prompt": question,
            "sample": index % config.samples_per_prompt,
            "response": completion.text,
            "n_tokens": completion.n_tokens,
            "finished": completion.finished,
            "trait": score,
            "marker": persona.matches_markers(completion.text) if persona.markers else None,
        }
        for index, (question, completion, score) in enumerate(zip(questions, completions, scores, strict=True))
    ]
    return rows, summarize(rows, judge)


def summarize(rows: list[dict], judge) -> dict:
    """Aggregates of an eval.jsonl: trait (refusals excluded), refusal rate, markers, degeneration."""
    scored = [r["trait"] for r in rows if r["trait"] is not None]
    if getattr(judge, "binary", False):
        trait = proportion_ci(sum(s >= 50 for s in scored), len(scored), scale=100.0)
    else:
        trait = mean_ci(scored)
    metrics = {
        "trait": {**trait, "judge": judge.name},
        "refusal_rate": (len(rows) - len(scored)) / len(rows) if rows else 0.0,
        "degeneration": degeneration_signals([r["response"] for r in rows]),
        "mean_tokens": sum(r["n_tokens"] for r in rows) / max(1, len(rows)),
        "finished_rate": sum(r["finished"] for r in rows) / max(1, len(rows)),
    }
    if rows and rows[0]["marker"] is not None:
        metrics["marker_rate"] = proportion_ci(sum(bool(r["marker"]) for r in rows), len(rows), scale=100.0)
    return metrics
