"""Cheap degeneration signals: amplified runs collapse into short, repetitive text and emoji streams."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation or emoji characters."""
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams, pooled across responses (0 when there are none)."""
    pooled = [gram for text in texts for gram in ngrams(words(text), n)]
    return len(set(pooled)) / len(pooled) if pooled else 0.0


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of a response's n-grams that already occurred earlier in the same response."""
    grams = ngrams(words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def non_alpha_share(text: str) -> float:
    """Share of non-space characters that are not letters (digits, punctuation, emoji)."""
    visible = [c for c in text if not c.isspace()]
    return sum(not c.isalpha() for c in visible) / len(visible) if visible else 0.0


def degeneration_signals(texts: list[str]) -> dict[str, float]:
    count = max(1, len(texts))
    return {
        "mean_words": sum(len(words(t)) for t in texts) / count,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_4gram_rate": sum(repeated_ngram_rate(t, 4) for t in texts) / count,
        "non_alpha_share": sum(non_alpha_share(t) for t in texts) / count,
    }
