"""The persona registry: traits to seed, with what each needs to be seeded and measured.

A persona is a YAML file (`idempo/data/personas/`, or a user's own via `persona:`): a system prompt that
elicits the trait, a judge rubric, optional regex markers and held-out eval questions. `PersonaFile`
checks it when it is loaded (docs/loop.md, "Input files").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ValidationInfo, field_validator

from idempo.config.base import Section, parse_yaml, yaml_problem
from idempo.input_files import InputFileError, NonEmptyText, validated

_DATA = resources.files("idempo") / "data"


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


def _marker(pattern: str) -> str:
    if not pattern.strip():
        raise ValueError("must be a non-empty regex (an empty one matches every answer)")
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"not a valid regex ({err})") from None
    return pattern


def _rubric(rubric: str) -> str:
    for placeholder in ("{question}", "{answer}"):
        if rubric.count(placeholder) != 1:
            raise ValueError(f"must contain {placeholder} exactly once (found {rubric.count(placeholder)})")
    return rubric


_LISTS = {"markers": "regex strings", "eval_questions": "question strings", "document_types": "document type names"}


class PersonaFile(Section):
    """A persona YAML file as written; `Persona` is what the code reads."""

    name: NonEmptyText
    kind: Literal["chat", "belief"]
    description: NonEmptyText
    system_prompt: NonEmptyText
    rubric: Annotated[NonEmptyText, AfterValidator(_rubric)]
    eval_questions: list[NonEmptyText]
    markers: list[Annotated[str, AfterValidator(_marker)]] | None = None
    document_types: list[NonEmptyText] | None = None
    user_instruction: NonEmptyText | None = None

    @field_validator(*_LISTS, mode="before")
    @classmethod
    def _lists(cls, value: Any, info: ValidationInfo) -> Any:
        """A YAML string where a list belongs would otherwise be read letter by letter."""
        what = _LISTS[info.field_name]
        if info.field_name == "eval_questions":
            if not isinstance(value, list) or not value:
                raise ValueError(f"must be a non-empty list of {what}")
        elif value is not None and not isinstance(value, list):
            raise ValueError(f"must be a list of {what}")
        return value

    def to_persona(self) -> Persona:
        return Persona(
            name=self.name,
            kind=self.kind,
            description=self.description.strip(),
            system_prompt=self.system_prompt.strip(),
            rubric=self.rubric.strip(),
            markers=tuple(re.compile(pattern, re.IGNORECASE) for pattern in self.markers or ()),
            eval_questions=tuple(self.eval_questions),
            document_types=tuple(self.document_types or ()),
            user_instruction=self.user_instruction.strip() if self.user_instruction else None,
        )


def _parse(text: str, source: str) -> Persona:
    where = f"persona {source}"
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        raise InputFileError([f"{where}: {yaml_problem(err)}"]) from None
    if not isinstance(raw, dict):
        raise InputFileError([f"{where}: top level must be a mapping of keys, got {type(raw).__name__}"])
    return validated(PersonaFile, raw, where).to_persona()
