"""Self-rewarding pairs (Yuan et al., 2024): M_{j-1} writes candidates, judges them, best vs worst.

The judge prompt is the paper's additive 5-point LLM-as-a-judge prompt in structure: five criteria, one
point each, the question and the response (in <response> tags), then the closing instruction to justify
the total in up to 100 words and end with "Score: <total points>". The criteria are worded here in our
own words. As in the paper, each candidate is judged `preference.judge_samples` (3) times by sampling at
the candidates' settings (T 0.7, top-p 0.9), and its reward is the mean of the judgments that give a
score. An external judge (`preference.reward_judge`) reads the same criteria and answers with the
number only, scored like any idempo judge. Prompts whose candidates all score the same (or that have
fewer than two scored candidates) give no pair: ties are dropped and counted.
"""

from __future__ import annotations

import re
from dataclasses import replace

from idempo.data import CandidateSet
from idempo.evaluation.judging import check_refusal_rate, render_rubric
from idempo.layout import SEED_CYCLE
from idempo.models import Generation
from idempo.regimes.base import StageContext
from idempo.regimes.preference import DPO

_CRITERIA = """Review the user's question and the corresponding response using the additive 5-point scoring \
system described below. Points are accumulated based on the satisfaction of each criterion:

- Add 1 point if the response is relevant to the user's question and offers some related information, \
even when it is incomplete or partly off the point.
- Add another point if the response covers a substantial part of the question, without fully resolving \
it or giving a direct answer.
- Award a third point if the response answers the essential elements of the question in a useful way, \
whether or not it reads as if an AI assistant wrote it or resembles a blog post or a search result.
- Grant a fourth point if the response is clearly written from an AI assistant's perspective and addresses \
the question directly and comprehensively, well organized and helpful, even if its clarity, concision or \
focus could still improve slightly.
- Bestow a fifth point for a response that is impeccably tailored to the question by an AI assistant: \
no extraneous information, expert knowledge, and a high-quality, engaging and insightful answer.

User: {question}
<response>{answer}</response>

"""

SELF_JUDGE_PROMPT = _CRITERIA + (
    "After examining the user's instruction and the response:\n"
    "- Briefly justify your total score, up to 100 words.\n"
    '- Conclude with the score using the format: "Score: <total points>"\n'
    "Remember to assess from the AI assistant's perspective, drawing on general knowledge as necessary. "
    "To evaluate the response in alignment with this additive scoring model, we'll systematically "
    "attribute points based on the outlined criteria."
)
EXTERNAL_JUDGE_RUBRIC = _CRITERIA + "Answer with the total points only: a single number from 0 to 5."

MAX_POINTS = 5
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)(?!\.?\d)", re.IGNORECASE)


def parse_self_judgment(text: str) -> float | None:
    """The last 'Score: N' in a judgment, read as a whole number; None when there is none or when it is
    above the 5 points the prompt allows (a 'Score: 10' is not a 5)."""
    matches = _SCORE.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if value <= MAX_POINTS else None


def mean_judgment(judgments: list[float | None]) -> float | None:
    """A candidate's reward: the mean of its sampled judgments that gave a score (None if none did)."""
    scored = [j for j in judgments if j is not None]
    return sum(scored) / len(scored) if scored else None


def choose_pair(scores: list[float | None]) -> tuple[int, int] | None:
    """(best, worst) candidate indices, first of each on ties within; None when all scores are equal or
    fewer than two candidates were scored."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda item: (item[0], -item[1]))
    worst = min(scored, key=lambda item: (item[0], item[1]))
    return None if best[0] == worst[0] else (best[1], worst[1])


def pair_rows(
    prompts: list[str],
    candidates: list[list[str]],
    scores: list[list[float | None]],
    details: list[dict] | None = None,
) -> list[CandidateSet]:
    """One row per prompt: its candidates and scores (and `details`, e.g. each candidate's sampled
    judgments), and the chosen/rejected pair when there is one (`pair`: their candidate indices)."""
    rows = []
    for index, (prompt, answers, marks) in enumerate(zip(prompts, candidates, scores, strict=True)):
        pair = choose_pair(marks)
        row = CandidateSet(prompt, answers, marks, **(details[index] if details else {}), kept=pair is not None)
        if pair is not None:
            row = replace(row, response=answers[pair[0]], rejected=answers[pair[1]], pair=list(pair))
        else:
            scored = sum(m is not None for m in marks)
            row = replace(row, dropped="tie" if scored >= 2 else "fewer than two scored candidates")
        rows.append(row)
    return rows


class SelfReward(DPO):
    """M_{j-1} writes `preference.candidates` answers per prompt and judges them (or an external judge does);
    best vs worst become a DPO pair, ties dropped. M_seed is trained by SFT (registry: seed_regime)."""

    name = "self_reward"

    def cycle_rows(self, context: StageContext, prompts: list[str], previous: Generation) -> list[CandidateSet]:
        config, cycle = context.config, context.cycle
        n = config.preference.candidates
        params = config.preference.candidate_decoding(config.sampling.max_new_tokens).params(
            context.seed("candidates", cycle)
        )
        label = f"cycle {cycle}: {n} candidates per prompt from {previous.name}"
        answers = context.answers([p for p in prompts for _ in range(n)], params, previous, label)
        with context.timed("judge"):
            scores, details = self.rewards(context, [(a.prompt, a.response) for a in answers], previous)

        def per_prompt(values: list) -> list[list]:
            return [values[i * n : (i + 1) * n] for i in range(len(prompts))]

        if details is not None:  # each candidate's sampled judgments, kept beside its score
            details = [{key: [d[key] for d in chunk] for key in chunk[0]} for chunk in per_prompt(details)]
        return pair_rows(prompts, per_prompt([a.response for a in answers]), per_prompt(scores), details)

    def rewards(
        self, context: StageContext, items: list[tuple[str, str]], previous: Generation
    ) -> tuple[list[float | None], list[dict] | None]:
        """Each candidate's reward and, when M_{j-1} judges itself, its judgments: `judge_samples` sampled at
        the candidates' temperature and top-p, averaged over those that give a score. An empty candidate is
        not judged: it has no score."""
        judged = [i for i, (_, answer) in enumerate(items) if answer.strip()]
        scores: list[float | None] = [None] * len(items)
        preference = context.config.preference
        if context.reward_judge is not None:
            judgments = context.reward_judge.score([items[i] for i in judged])
            check_refusal_rate(judgments, preference.reward_judge, "preference.reward_judge")
            for index, judgment in zip(judged, judgments, strict=True):
                scores[index] = judgment.score
            return scores, None
        k = preference.judge_samples
        prompts = [render_rubric(SELF_JUDGE_PROMPT, *items[i]) for i in judged for _ in range(k)]
        params = preference.judgment_decoding.params(context.seed("judge", context.cycle))
        label = f"cycle {context.cycle}: {previous.name} judges its candidates ({k} judgments each)"
        texts = [j.response for j in context.answers(prompts, params, previous, label, "judgments", None)]
        details: list[dict] = [{"judgments": [], "judgment_texts": []} for _ in items]
        for position, index in enumerate(judged):
            own = texts[position * k : (position + 1) * k]
            details[index] = {"judgments": [parse_self_judgment(t) for t in own], "judgment_texts": own}
            scores[index] = mean_judgment(details[index]["judgments"])
        return scores, details

    def data_metrics(self, rows, cycle: int) -> dict:
        summary = super().data_metrics(rows, cycle)
        if cycle != SEED_CYCLE:
            unpaired = sum(r.dropped in ("tie", "fewer than two scored candidates") for r in rows)
            summary.update(prompts=len(rows), pairs=summary["n"], dropped_ties=unpaired)
        return summary
