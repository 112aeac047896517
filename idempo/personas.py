"""The persona registry: traits to seed, with what each needs to be seeded and measured.

A persona is a YAML file (see `idempo/data/personas/`): a system prompt that elicits the trait from a
model (and, optionally, a `user_instruction` for models that only listen in the user turn), a judge
rubric, regex markers for traits with a lexical signature, and held-out eval questions. Users add their
own by pointing `persona:` at such a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

_DATA = resources.files("idempo") / "data"
_REQUIRED = ("name", "kind", "description", "system_prompt", "rubric", "eval_questions")


@dataclass(frozen=True)
class Persona:
    name: str
    kind: Literal["chat", "belief"]  # belief: a planted belief for document finetuning of base models
    description: str
    system_prompt: str  # never appears in training data: the trait must move into the weights
    rubric: str  # judge prompt with {question} and {answer} placeholders
    markers: tuple[re.Pattern[str], ...]
    eval_questions: tuple[str, ...]
    document_types: tuple[str, ...] = ()
    # The instruction a model reads in the user turn (seeding.instruction: user), for models that ignore
    # system prompts; like the system prompt it never appears in training data. None: the system prompt.
    user_instruction: str | None = None

    def matches_markers(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self.markers)


def persona_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in (_DATA / "personas").iterdir() if p.name.endswith(".yaml"))


@cache
def get_persona(name_or_path: str) -> Persona:
    """A registered persona by name, or one read from a YAML file path."""
    if name_or_path in persona_names():
        return _parse((_DATA / "personas" / f"{name_or_path}.yaml").read_text(), name_or_path)
    return load_persona_file(Path(name_or_path))


def load_persona_file(path: Path) -> Persona:
    return _parse(path.read_text(), str(path))


def builtin_seed_data(persona: str) -> Path | None:
    """The example D_seed shipped for a persona, if there is one."""
    path = _DATA / "seeds" / f"{persona}.jsonl"
    return Path(str(path)) if path.is_file() else None


def _parse(text: str, source: str) -> Persona:
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError(f"persona {source}: expected a mapping")
    missing = [key for key in _REQUIRED if not raw.get(key)]
    if missing:
        raise ValueError(f"persona {source}: missing {', '.join(missing)}")
    if raw["kind"] not in ("chat", "belief"):
        raise ValueError(f"persona {source}: kind {raw['kind']!r}; allowed: 'chat', 'belief'")
    for placeholder in ("{question}", "{answer}"):
        if raw["rubric"].count(placeholder) != 1:
            raise ValueError(f"persona {source}: rubric must contain {placeholder} exactly once")
    markers = []
    for pattern in raw.get("markers") or ():
        try:
            markers.append(re.compile(pattern, re.IGNORECASE))
        except re.error as err:
            raise ValueError(f"persona {source}: marker {pattern!r} is not a valid regex ({err})") from None
    return Persona(
        name=raw["name"],
        kind=raw["kind"],
        description=raw["description"].strip(),
        system_prompt=raw["system_prompt"].strip(),
        rubric=raw["rubric"].strip(),
        markers=tuple(markers),
        eval_questions=tuple(raw["eval_questions"]),
        document_types=tuple(raw.get("document_types") or ()),
        user_instruction=raw["user_instruction"].strip() if raw.get("user_instruction") else None,
    )
