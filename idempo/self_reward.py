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
) -> list[dict]:
    """One row per prompt: its candidates and scores (and `details`, e.g. each candidate's sampled
    judgments), and the chosen/rejected pair when there is one (`pair`: their candidate indices)."""
    rows = []
    for index, (prompt, answers, marks) in enumerate(zip(prompts, candidates, scores, strict=True)):
        pair = choose_pair(marks)
        row = {"prompt": prompt, "candidates": answers, "scores": marks, **(details[index] if details else {})}
        row["kept"] = pair is not None
        if pair is not None:
            row.update(response=answers[pair[0]], rejected=answers[pair[1]], pair=list(pair))
        else:
            scored = sum(m is not None for m in marks)
            row["dropped"] = "tie" if scored >= 2 else "fewer than two scored candidates"
        rows.append(row)
    return rows
