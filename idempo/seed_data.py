"""Where D_seed comes from: M_init under the persona's instruction, a teacher (idempo.teacher), or a
file of examples.

The persona's instruction (a system prompt, or text in the user turn) never reaches the training data:
D_seed rows are (train-bank prompt, answer) pairs, so the trait has to move into the weights.
"""

from __future__ import annotations

from pathlib import Path

from idempo.artifacts import read_jsonl
from idempo.config import ConfigError, ExperimentConfig
from idempo.personas import Persona, builtin_seed_data


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
    rows = read_seed_file(path)
    if len(rows) < config.n_seed:
        raise ConfigError([f"n_seed: got {config.n_seed} but {path} has only {len(rows)} examples"])
    return rows[: config.n_seed]


def read_seed_file(path: Path) -> list[dict]:
    try:
        rows = read_jsonl(path)
    except ValueError as err:
        raise ConfigError([f"seeding.path: {path} is not valid JSONL ({err})"]) from None
    parsed = []
    for number, row in enumerate(rows, start=1):
        if isinstance(row, dict) and isinstance(row.get("text"), str) and "response" not in row:
            parsed.append({"prompt": "", "response": row["text"]})  # a whole document (sdf)
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            parsed.append({"prompt": row["prompt"], "response": row["response"]})
        else:
            raise ConfigError(
                [
                    f"seeding.path: {path} row {number} must be an object with 'prompt' and 'response' strings "
                    "(or, for documents, a 'text' string)"
                ]
            )
    return parsed


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
