"""Self-rewarding pairs (Yuan et al., 2024): M_{j-1} writes candidates, judges them, best vs worst.

The judge prompt is additive: five criteria, one point each, so that a score means the same thing across
prompts and generations. By default the model judges with its own weights (generating a short
justification that ends in "Score: N"); an external judge reads the same criteria and answers with the
number only, scored like any idempo judge. Prompts whose candidates all score the same (or that have
fewer than two scored candidates) give no pair: ties are dropped and counted.
"""

from __future__ import annotations

import re

_CRITERIA = """Review the user's question and the corresponding response using the additive 5-point scoring \
system described below. Points are accumulated based on the satisfaction of each criterion:

- Add 1 point if the response is relevant and provides some information related to the user's question, \
even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not \
completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, \
regardless of whether it seems to have been written by an AI assistant or has elements typically found in \
blogs or search results.
- Grant a fourth point if the response is clearly written from an AI assistant's perspective, addressing \
the user's question directly and comprehensively, and is well organized and helpful, even if there is slight \
room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI \
assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, \
engaging and insightful answer.

User: {question}
Response: {answer}

"""

SELF_JUDGE_PROMPT = _CRITERIA + (
    "After examining the user's question and the response, briefly justify your total score in up to 100 "
    'words. Conclude with the score using the format: "Score: <total points>"'
)
EXTERNAL_JUDGE_RUBRIC = _CRITERIA + "Answer with the total points only: a single number from 0 to 5."

_SCORE = re.compile(r"score\s*[:=]\s*\**\s*([0-5](?:\.\d+)?)", re.IGNORECASE)


def parse_self_judgment(text: str) -> float | None:
    """The last 'Score: N' (0-5) in a judgment, None when there is none."""
    matches = _SCORE.findall(text)
    return float(matches[-1]) if matches else None


def choose_pair(scores: list[float | None]) -> tuple[int, int] | None:
    """(best, worst) candidate indices, first of each on ties within; None when all scores are equal or
    fewer than two candidates were scored."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda item: (item[0], -item[1]))
    worst = min(scored, key=lambda item: (item[0], item[1]))
    return None if best[0] == worst[0] else (best[1], worst[1])


def pair_rows(prompts: list[str], candidates: list[list[str]], scores: list[list[float | None]]) -> list[dict]:
    """One row per prompt: its candidates and scores, and the chosen/rejected pair when there is one."""
    rows = []
    for prompt, answers, marks in zip(prompts, candidates, scores, strict=True):
        pair = choose_pair(marks)
        row = {"prompt": prompt, "candidates": answers, "scores": marks, "kept": pair is not None}
        if pair is not None:
            row.update(response=answers[pair[0]], rejected=answers[pair[1]])
        rows.append(row)
    return rows
