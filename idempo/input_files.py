"""Files users hand idempo beside the config (persona YAML, prompt and seed JSONL), read through typed models.

A bad value fails when its file is loaded, before any model is touched, with one line per problem that
names the file (and the line of a JSONL row), the field, the value and what is allowed: a value that
slipped through would not crash, it would change the numbers (a marker string scored letter by letter,
a question list read as single characters).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from idempo.config.base import describe_error

MAX_PROBLEMS = 10  # a file with thousands of bad rows is reported by its first few
Row = TypeVar("Row", bound=BaseModel)


class InputFileError(ValueError):
    """An input file that cannot be used; `problems` are 'file[:line]: field: message' lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty string")
    return value


NonEmptyText = Annotated[str, AfterValidator(_non_empty)]


def validated(model: type[Row], data: Any, where: str) -> Row:
    """`data` as a `model`, or an InputFileError with one '<where>: field: ...' line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [f"{where}: {line}" for e in err.errors() for line in describe_error(e, model).splitlines()]
        raise InputFileError(_capped(lines)) from None


def read_jsonl_rows(path, row_model: Callable[[dict], type[Row]], shape: str) -> list[Row]:
    """The rows of a JSONL file (a path or a package resource), one JSON object a line (blank lines
    skipped), each validated by `row_model(row)`, the model that row must follow; `shape` shows a good row
    in messages."""
    path = Path(path) if isinstance(path, str) else path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputFileError([f"{path}: no such file"]) from None
    except UnicodeDecodeError as err:
        raise InputFileError([f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"]) from None
    rows, problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(
                f"{where}: not valid JSON ({err.msg} at column {err.colno}); must be an object like {shape}"
            )
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: got {_short(row)}; must be a JSON object like {shape}")
            continue
        try:
            rows.append(validated(row_model(row), row, where))
        except InputFileError as err:
            problems += err.problems
    if problems:
        raise InputFileError(_capped(problems))
    if not rows:
        raise InputFileError([f"{path}: no rows; must hold one JSON object a line, like {shape}"])
    return rows


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
