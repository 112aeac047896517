"""What each phase of a trial wrote, and the check before anything written is used again.

Each dir a trial writes into keeps a `manifest.json` with a record per file (sha256, size, JSONL rows;
each file of a weights dir), written before the file is renamed into place: a file on disk always has
its record, and a record whose file is missing is a phase that did not finish. What is checked, when, and
what a `DamagedArtifact` says: docs/loop.md, "Resume and determinism". A file rewritten with more rows
(`initial-answers.jsonl`) keeps the hash of the version it replaces in its record, so a rewrite that
never landed leaves a file that still checks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from idempo.artifacts import file_sha256, json_text, jsonl_text, write_text

MANIFEST = "manifest.json"


class DamagedArtifact(RuntimeError):
    """A file idempo wrote is not what it wrote (truncated, edited, corrupted on disk) or does not parse."""


class Records:
    """Writes a trial's artifacts with their records, and checks them before they are read again.

    `redo(path)` says how to redo what `path` belongs to (the layout knows which dirs build on it);
    `note` receives the one-line notes on files without a record."""

    def __init__(self, redo: Callable[[Path], str], note: Callable[[str], None] = lambda message: None):
        self.redo = redo
        self.note = note
        self._checked: set[Path] = set()
        self._noted = False

    # -- writing ----------------------------------------------------------------------------------

    def write_text(self, path: Path, text: str, rows: int | None = None) -> None:
        data = text.encode("utf-8")
        entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if rows is not None:
            entry["rows"] = rows
        previous = recorded(path)
        if path.is_file() and previous is not None and file_sha256(path) == previous["sha256"]:
            entry["replaces"] = previous["sha256"]  # a rewrite: until it lands, the file it replaces stands
        record(path, entry)
        write_text(path, text)
        self._checked.add(path)

    def write_json(self, path: Path, data: Any) -> None:
        self.write_text(path, json_text(data))

    def write_jsonl(self, path: Path, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        self.write_text(path, jsonl_text(rows), rows=len(rows))

    def record_tree(self, path: Path, built: Path) -> None:
        """Record the files of `built`, the temporary dir `atomic_dir` is about to rename to `path`."""
        record(path, tree_entry(built))
        self._checked.add(path)

    # -- reading ----------------------------------------------------------------------------------

    def read_jsonl(self, path: Path, nonempty: bool = False) -> list[dict[str, Any]]:
        """The rows of `path`, checked against its record; `nonempty`: a file with no rows is damaged too
        (idempo never writes an empty data file: every prompt leaves a row, kept or dropped)."""
        data = self._checked_bytes(path)
        rows = _jsonl_rows(path, data, self.redo)
        if nonempty and not rows:
            raise DamagedArtifact(
                f"{path}: holds no rows, and idempo writes a row for every prompt of a stage; {self.redo(path)}"
            )
        return rows

    def read_json(self, path: Path) -> Any:
        data = self._checked_bytes(path)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DamagedArtifact(f"{path}: not JSON ({err}); {self.redo(path)}") from None

    def check_tree(self, path: Path) -> None:
        """Every file of the weights dir `path` is the one recorded (and no file is missing or added)."""
        if path in self._checked:
            return
        expected = recorded(path)
        if expected is None:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                problem = _unrecorded_problem(file)
                if problem:
                    raise DamagedArtifact(f"{file}: {problem}; {self.redo(path)}")
            self._unrecorded(path)
        else:
            found = tree_entry(path)["files"]
            problems = []
            for name in sorted(set(expected.get("files", {})) | set(found)):
                want, got = expected.get("files", {}).get(name), found.get(name)
                if want is None:
                    problems.append(f"{name} is not in the record")
                elif got is None:
                    problems.append(f"{name} is missing")
                elif got["sha256"] != want["sha256"]:
                    problems.append(f"{name}: expected {_describe(want)}, found {_describe(got)}")
            if problems:
                raise DamagedArtifact(
                    f"{path}: not the weights idempo wrote ({'; '.join(problems)}); {self.redo(path)}"
                )
        self._checked.add(path)

    def _checked_bytes(self, path: Path) -> bytes:
        """The file's contents, once they are known to be what its record says (or it has no record)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DamagedArtifact(f"{path}: missing; {self.redo(path)}") from None
        if path in self._checked:
            return data
        expected = recorded(path)
        if expected is None:
            self._unrecorded(path)
        else:
            digest = hashlib.sha256(data).hexdigest()
            if digest not in (expected["sha256"], expected.get("replaces")):
                found = {"sha256": digest, "bytes": len(data)}
                if "rows" in expected:
                    found["rows"] = _count_rows(data)
                raise DamagedArtifact(
                    f"{path}: changed since idempo wrote it: expected {_describe(expected)}, found "
                    f"{_describe(found)}; {self.redo(path)}"
                )
        self._checked.add(path)
        return data

    def _unrecorded(self, path: Path) -> None:
        if not self._noted:
            self.note(f"note: {path} and files like it have no record (written by an earlier idempo): used unchecked")
            self._noted = True


def record(path: Path, entry: dict[str, Any]) -> None:
    """Set `path`'s entry in its dir's manifest."""
    manifest = path.parent / MANIFEST
    entries = read_manifest(manifest)
    entries[path.name] = entry
    write_text(manifest, json_text(dict(sorted(entries.items()))))


def recorded(path: Path) -> dict[str, Any] | None:
    """`path`'s entry in its dir's manifest; None for a file written before idempo kept records."""
    return read_manifest(path.parent / MANIFEST).get(path.name)


def read_manifest(manifest: Path) -> dict[str, Any]:
    if not manifest.is_file():
        return {}
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedArtifact(
            f"{manifest}: not JSON ({err}); it records what idempo wrote in {manifest.parent}, so that dir "
            "cannot be checked: delete it to redo what it holds"
        ) from None
    if not isinstance(entries, dict):
        raise DamagedArtifact(f"{manifest}: expected an object of records, found {type(entries).__name__}")
    return entries


def tree_entry(root: Path) -> dict[str, Any]:
    """The record of a weights dir: every file in it, by its path inside the dir."""
    files = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        files[file.relative_to(root).as_posix()] = {"sha256": file_sha256(file), "bytes": file.stat().st_size}
    return {"files": files}


def _jsonl_rows(path: Path, data: bytes, redo: Callable[[Path], str]) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DamagedArtifact(
                f"{path}, line {number}: not JSON ({err}; the file may be truncated); {redo(path)}"
            ) from None
    return rows


def _count_rows(data: bytes) -> str:
    """The rows of a JSONL file that parse, and the lines that do not (a truncated last row)."""
    good = bad = 0
    for line in data.decode("utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                json.loads(line)
                good += 1
            except json.JSONDecodeError:
                bad += 1
    return f"{good} rows" + (f" and {bad} line{'s' if bad > 1 else ''} that do not parse" if bad else "")


def _describe(entry: dict[str, Any]) -> str:
    rows = entry.get("rows")
    counted = "" if rows is None else f"{rows} rows, " if isinstance(rows, int) else f"{rows}, "
    return f"{counted}{entry['bytes']} bytes, sha256 {entry['sha256'][:12]}"


def _unrecorded_problem(file: Path) -> str | None:
    """What is visibly wrong with an unrecorded weights file: JSON that does not parse, or safetensors
    whose length is not what its header says (a truncated copy)."""
    if file.suffix == ".json":
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"not JSON ({err})"
    if file.suffix == ".safetensors":
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{size} bytes: not a safetensors file"
            (header_size,) = struct.unpack("<Q", head)
            try:
                header = json.loads(handle.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError, ValueError):
                return "its safetensors header does not parse (truncated or corrupted)"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if size != 8 + header_size + end:
            return f"{size} bytes, but its safetensors header describes {8 + header_size + end} (truncated?)"
    return None
