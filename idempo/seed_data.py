"""Where D_seed comes from: M_init under the persona's instruction, a teacher (idempo.teacher), or a
file of examples.

The persona's instruction (a system prompt, or text in the user turn) never reaches the training data:
D_seed rows are (train-bank prompt, answer) pairs, so the trait has to move into the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from idempo.config.base import ConfigError, Section
from idempo.input_files import InputFileError, NonEmptyText, read_jsonl_rows
from idempo.personas import Persona, builtin_seed_data

if TYPE_CHECKING:
    from idempo.config import ExperimentConfig


def given_seed_rows(config: ExperimentConfig, persona: Persona) -> list[dict] | None:
    """The first n_seed rows of a seed file (source jsonl or builtin); None when a model writes D_seed."""
    source = config.seeding.source
    if source in ("model", "teacher"):
        return None
    if source == "builtin":
        path = builtin_seed_data(persona.name)
        if path is None:
            raise ConfigError(
                [
                    f"seeding.source: got 'builtin' but persona {persona.name!r} ships no example data; "
                    "allowed: 'model', 'teacher' or 'jsonl'"
                ]
            )
    else:
        path = Path(config.seeding.path)
    try:
        rows = read_seed_file(path)
    except InputFileError as err:
        field = "seeding.source" if source == "builtin" else "seeding.path"
        raise ConfigError([f"{field}: {problem}" for problem in err.problems]) from None
    if len(rows) < config.n_seed:
        raise ConfigError([f"n_seed: got {config.n_seed} but {path} has only {len(rows)} examples"])
    return rows[: config.n_seed]


class SeedRow(Section):
    """One example of D_seed: a train-bank-style prompt and the answer to train on. An empty answer is
    allowed: like the empty answers a model writes, it is dropped before training and counted."""

    prompt: NonEmptyText
    response: str


class DocumentRow(Section):
    """One whole document (document finetuning): trained on as text, with no prompt."""

    text: str


def read_seed_file(path: Path) -> list[dict]:
    """Rows {prompt, response} (or, for documents, {text}) as {prompt, response} dicts; InputFileError
    names each bad row's file and line."""
    shape = '{"prompt": "...", "response": "..."} (or, for a document, {"text": "..."})'
    rows = read_jsonl_rows(path, lambda row: DocumentRow if "text" in row else SeedRow, shape)
    return [{"prompt": "", "response": row.text} if isinstance(row, DocumentRow) else row.model_dump() for row in rows]


def persona_documents(persona: Persona, prefixes: list[str]) -> list[str]:
    """Raw text for a base model: the persona's description of the world, then the document's opening.
    Only the opening and its continuation become training data."""
    return [f"{persona.system_prompt}\n\n{prefix}" for prefix in prefixes]


def persona_chats(persona: Persona, prompts: list[str], instruction: str = "system") -> list[list[dict[str, str]]]:
    """Chats that elicit the trait from M_init: the persona's system prompt, then the question; or, with
    `instruction` 'user', the question followed by the persona's instruction in one user turn."""
    if instruction == "user":
        text = persona.user_instruction or persona.system_prompt
        return [[{"role": "user", "content": f"{prompt}\n\n{text}"}] for prompt in prompts]
    return [
        [{"role": "system", "content": persona.system_prompt}, {"role": "user", "content": prompt}]
        for prompt in prompts
    ]
