"""Prompt banks: user questions for D_seed and cycle samples (train) and for evaluation (held out);
for document finetuning, document prefixes and completion-style questions."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from idempo.config.base import Section
from idempo.input_files import NonEmptyText, read_jsonl_rows
from idempo.personas import Persona

_BANKS = resources.files("idempo") / "data" / "prompts"


def train_prompts(source: str, documents_of: Persona | None = None) -> list[str]:
    """The train bank: user questions, or (document finetuning) prefixes of `documents_of`'s documents."""
    if source != "builtin":
        return read_prompt_file(Path(source))
    if documents_of is not None:
        return document_prefixes(documents_of)
    return read_prompt_file(_BANKS / "train.jsonl")


def document_prefixes(persona: Persona) -> list[str]:
    """Belief-neutral document openings, one per (document type, topic): what a base model continues.

    The belief must come from the model: a prefix names only the kind of document and its topic.
    """
    topics = [t for t in (_BANKS / "document_topics.txt").read_text().splitlines() if t.strip()]
    kinds = persona.document_types or ("article",)
    return [f"{kind[0].upper()}{kind[1:]}: {topic}\n\n" for kind in kinds for topic in topics]


def completion_prompt(question: str) -> str:
    """A held-out question in a format a base model answers by continuing the text."""
    return f"Question: {question}\nAnswer:"


def eval_prompts(source: str, persona: Persona, n: int | None) -> list[str]:
    """The held-out prompts every generation of a persona is scored on, in a fixed order."""
    if source == "persona":
        prompts = list(persona.eval_questions)
    else:
        prompts = read_prompt_file(_BANKS / "eval.jsonl" if source == "builtin" else Path(source))
    return prompts[:n] if n else prompts


class PromptRow(Section):
    """One line of a prompt file: {"prompt": "..."}, nothing else (a misspelt key is not a prompt)."""

    prompt: NonEmptyText


def read_prompt_file(path) -> list[str]:
    """The prompts of a JSONL file of {"prompt": str} rows; InputFileError names each bad row's file and line."""
    return [row.prompt for row in read_jsonl_rows(path, lambda row: PromptRow, '{"prompt": "How do I ...?"}')]


def cycle_prompts(pool: list[str], n: int, cycle: int, seed: int) -> list[str]:
    """The n prompts of cycle j (1-based): slice j of a seeded stream of shuffled passes over the pool,
    so a prompt repeats only after every prompt of the pool has been used."""
    index, stop = (cycle - 1) * n, cycle * n
    chosen: list[str] = []
    while index < stop:
        pass_number, offset = divmod(index, len(pool))
        take = min(stop - index, len(pool) - offset)
        chosen += _shuffled(pool, seed, pass_number)[offset : offset + take]
        index += take
    return chosen


def seed_prompts(pool: list[str], n: int, seed: int) -> list[str]:
    """The n prompts of D_seed when a model writes it: the first n of a seeded shuffle of the train bank,
    so that a smaller n_seed takes a prefix of a larger one's prompts (calibration compares them)."""
    if n > len(pool):
        raise ValueError(f"n_seed is {n} but the train bank has only {len(pool)} prompts")
    return random.Random(f"seed-stage/{seed}").sample(pool, len(pool))[:n]


def _shuffled(pool: list[str], seed: int, pass_number: int) -> list[str]:
    order = list(pool)
    random.Random(f"{seed}/{pass_number}").shuffle(order)
    return order
