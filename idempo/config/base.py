"""The machinery every config file shares: YAML that refuses what it would silently misread, strict
sections, and errors that name the field, the value and what is allowed."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Hashable
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict

INPUT_FILE = "input_file"  # the pydantic error type of a persona, prompt or seed file the config names


class DuplicateKey(yaml.YAMLError):
    """A key set twice in one mapping: YAML keeps the last value without a word, so one of the two settings
    would be ignored."""


class _Loader(yaml.SafeLoader):
    """YAML with 1.2-style floats ('3e-4' is a number, not the string PyYAML's 1.1 rules make of it) that
    refuses a key set twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges keys, then overrides them
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # the base class reports it
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKey(
                        f"line {line}: duplicate key {key!r} (first set on line {first_line[key]}); "
                        "a key may appear once per mapping"
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line that says where: 'line 3, column 5: ...' (PyYAML's own spans several)."""
    if isinstance(err, DuplicateKey):
        return str(err)
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML: {where}{problem}" + (f" ({context})" if context else "")


class ConfigError(ValueError):
    """A config that cannot run; `problems` are 'field.path: message' lines."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"invalid {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class Section(BaseModel):
    """Every section: no unknown keys, no coercion ('3' is not 3), and finite numbers only: a `.inf` passes
    bounds like `gt=0`, and a `.nan` turns whatever it touches into nan."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def fill_missing(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` with every key of `defaults` that it lacks (sections merged, not replaced)."""
    filled = dict(data)
    for key, value in defaults.items():
        if isinstance(value, dict):
            section = filled.get(key, {})
            filled[key] = fill_missing(section, value) if isinstance(section, dict) else section
        elif key not in filled:
            filled[key] = value
    return filled


def read_yaml_mapping(path: str | Path, kind: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or a ConfigError that says what is wrong with it."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"no such {kind} file: {path}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([yaml_problem(err)], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping of keys, got {type(raw).__name__}"], source=str(path))
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], option: str = "--set") -> dict[str, Any]:
    """Return a copy of `raw` with each 'a.b.c=value' set; value is parsed as YAML ('3' -> 3, 'null' -> None)."""
    data = yaml.safe_load(yaml.safe_dump(raw))  # deep copy through plain types
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"{option} {item!r}: expected key.path=value"])
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError([f"{option} {key}: value {text!r}: {yaml_problem(err)}"]) from None
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{option} {key}: {'.'.join(parts[: depth + 1])} is not a section"])
            node = child
        node[parts[-1]] = value
    return data


def describe_error(error: dict[str, Any], root: type[BaseModel]) -> str:
    """One 'path: got value; what is allowed' line from a pydantic error of `root` (a config's top section);
    a file the field names that cannot be used gives one line per problem of the file."""
    loc = [str(p) for p in error["loc"]]
    path = ".".join(loc) or "(top level)"
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if error["type"] == INPUT_FILE:
        return "\n".join(f"{path}: {line}" for line in message.splitlines())
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1], root)
        allowed = choices(parent.model_fields) if parent else "none"
        return f"{path}: unknown key; allowed keys here: {allowed}"
    if error["type"] == "missing":
        return f"{path}: required field is missing"
    if error["type"] == "variable_name":
        return f"{path}: got a value that is not a variable name (not shown: it may be a key); {message}"
    got = error.get("input")
    if error["type"] == "model_type":
        return f"{path}: got {got!r}; must be a section (a mapping of keys)"
    if isinstance(got, dict):  # a check across a section's fields
        if not loc and re.match(r"[\w.]+: ", message):  # the check names the field it is about
            return message
        return f"{path}: {message}"
    return f"{path}: got {got!r}; {message}"


def _model_at(loc: list[str], root: type[BaseModel]) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def existing_path(value: str, allowed: str = "an existing file") -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file; allowed: {allowed}")
    return str(path.resolve())


def choices(names) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def explain(section: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of `section` and its subsections: dotted name, type, default and description
    (`idempo config --explain`)."""
    lines = []
    for name, field in section.model_fields.items():
        kinds = [k for k in (field.annotation, *get_args(field.annotation)) if isinstance(k, type)]
        subsection = next((k for k in kinds if issubclass(k, BaseModel)), None)
        kind = (
            re.sub(r"\b(typing|idempo\.[\w.]+)\.", "", str(field.annotation)).replace("<class '", "").replace("'>", "")
        )
        default = "required" if field.is_required() else None
        if default is None and subsection is None:
            value = field.get_default(call_default_factory=True)
            default = f"default {value!r}"
        lines.append(f"{prefix}{name}  ({kind}{', ' + default if default else ''})")
        lines += textwrap.wrap(field.description or "", 100, initial_indent="    ", subsequent_indent="    ")
        if subsection is not None:
            lines += explain(subsection, f"{prefix}{name}.")
    return lines
