"""A few answers of each generation, so a reader sees what a score means.

Read from each completed cycle's eval.jsonl: one answer to each of the first prompts the judge scored,
the same prompts every cycle, so each generation's answer reads beside the one before it. Only one
replica per configuration is shown, which bounds the page at any number of replicas.
"""

from __future__ import annotations

from idempo.artifacts import read_jsonl
from idempo.layout import TrialLayout
from idempo.report.results import SweepResults, TrialResult

MAX_CHARS = 800  # an answer is cut here: enough to read its tone, a bounded page


def representatives(results: SweepResults) -> list[TrialResult]:
    """One trial per configuration: the first of its replicas that has completed a stage."""
    chosen = (next((t for t in members if t.history), None) for members in results.replica_groups().values())
    return [trial for trial in chosen if trial is not None]


def sampled_answers(trial: TrialResult, per_cycle: int) -> list[dict]:
    """Per completed stage, `per_cycle` answers with their trait and coherence scores ("refused" where the
    judge refused to score, None where there is no such judge)."""
    layout, rows = TrialLayout(trial.directory), []
    for cycle in [m["cycle"] for m in trial.history]:
        path = layout.eval(cycle)
        scored = [row for row in (read_jsonl(path) if path.exists() else []) if not row.get("bf_only")]
        prompts = list(dict.fromkeys(row["prompt"] for row in scored))[:per_cycle]
        for prompt in prompts:
            row = next(row for row in scored if row["prompt"] == prompt)
            answer = row["response"] if len(row["response"]) <= MAX_CHARS else row["response"][:MAX_CHARS] + " [...]"
            scores = {
                name: "refused" if row.get(f"{name}_refusal") else row.get(name) for name in ("trait", "coherence")
            }
            rows.append({"cycle": cycle, **scores, "prompt": prompt, "answer": answer})
    return rows
