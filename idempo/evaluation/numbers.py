"""The numbers 0..100 as token paths, and the probability a judge gives each whole number.

A tokenizer may write 85 as "85" or as "8", "5"; reading the first token alone would score 85 as 8. So

    p(v) = P(path of v | prompt) * P(next token does not continue the number | prompt, v)

where a token continues the number when its text starts with a digit; "85" and " 85" pool into one value
(docs/metrics.md, "Judges whose tokenizer splits numbers"). The paths share prefixes, so they form a trie
whose nodes are the places where a next-token distribution is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

Path = tuple[int, ...]

LOWEST, HIGHEST = 0, 100
SPELLINGS = tuple(f"{space}{value}" for value in range(LOWEST, HIGHEST + 1) for space in ("", " "))
# Numbers are tokenized after a newline, where the judge's answer starts in chat templates: a
# SentencePiece tokenizer would otherwise put its word-start marker in front of "85".
ANCHOR = "\n"


def continues_number(text: str) -> bool:
    """Whether a token with this text, written after a number, makes it a longer number."""
    return text[:1].isascii() and text[:1].isdigit()


def text_after_anchor(anchored: str, anchor: str, alone: str) -> str:
    """A token's own text, from its decoding after the anchor (`anchored`) or, where that does not
    start with the anchor, its decoding alone. SentencePiece drops a leading space when a token is
    decoded alone, which would make " 5" read as "5"."""
    return anchored[len(anchor) :] if anchored.startswith(anchor) else alone


def path_after_anchor(anchor_ids: list[int], anchored_ids: list[int]) -> Path | None:
    """The tokens of a spelling encoded after the anchor, or None where the tokenizer merged the
    anchor with the spelling (then the spelling must be encoded alone)."""
    if anchored_ids[: len(anchor_ids)] != anchor_ids or len(anchored_ids) == len(anchor_ids):
        return None
    return tuple(anchored_ids[len(anchor_ids) :])


def spelling_paths(encode: Callable[[str], list[int]]) -> dict[str, Path]:
    """Every spelling's token path, for a tokenizer at hand (`encode` adds no special tokens)."""
    anchor_ids = encode(ANCHOR)
    anchored = {spelling: encode(ANCHOR + spelling) for spelling in SPELLINGS}
    return distinct_paths({s: path_after_anchor(anchor_ids, ids) or tuple(encode(s)) for s, ids in anchored.items()})


def distinct_paths(paths: Mapping[str, Path]) -> dict[str, Path]:
    """One spelling per token path: where " 85" and "85" tokenize the same, they are one event."""
    seen: set[Path] = set()
    distinct = {}
    for spelling in SPELLINGS:
        path = tuple(paths[spelling])
        if path and path not in seen:
            seen.add(path)
            distinct[spelling] = path
    return distinct


def splits_numbers(paths: Mapping[str, Path]) -> bool:
    """Whether some number 0..100 (without a leading space) takes more than one token."""
    return any(len(path) > 1 for spelling, path in paths.items() if not spelling.startswith(" "))


def trie_nodes(paths: Iterable[Path]) -> list[Path]:
    """The root and every prefix of every path (the paths included), shortest first."""
    nodes = {path[:length] for path in paths for length in range(len(path) + 1)}
    return sorted(nodes, key=lambda node: (len(node), node))


def trie_leaves(nodes: Iterable[Path]) -> list[Path]:
    """The nodes that no other node extends: a forward pass over a leaf reads every node on its way."""
    nodes = list(nodes)
    inner = {node[:-1] for node in nodes if node}
    return [node for node in nodes if node and node not in inner]


def trie_children(nodes: Iterable[Path]) -> list[int]:
    """Every token that extends some node: the only next tokens whose probability the paths need."""
    return sorted({node[-1] for node in nodes if node})


def node_key(node: Path) -> str:
    return ",".join(map(str, node))


def spelling_probabilities(
    paths: Mapping[str, Path], next_logprobs: Mapping[Path, Mapping[int, float]], ends: Mapping[Path, float]
) -> dict[str, float]:
    """p(spelling) = product of next-token probabilities along its path, times the end probability at
    its last node. A step whose token is not among the readings (below an endpoint's top-k) has
    probability 0 here, so the result is a lower bound wherever readings are truncated."""
    probabilities = {}
    for spelling, path in paths.items():
        logprob = 0.0
        for depth, token in enumerate(path):
            step = next_logprobs.get(path[:depth], {}).get(token)
            if step is None:
                logprob = -math.inf
                break
            logprob += step
        probability = math.exp(logprob) * ends.get(path, 0.0) if logprob > -math.inf else 0.0
        if probability > 0:
            probabilities[spelling] = probability
    return probabilities


def value_probabilities(probabilities: Mapping[str, float]) -> dict[int, float]:
    """Spellings of the same number (" 85", "85") pooled."""
    pooled: dict[int, float] = {}
    for spelling, probability in probabilities.items():
        value = int(spelling)
        pooled[value] = pooled.get(value, 0.0) + probability
    return pooled
