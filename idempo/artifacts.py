"""Atomic writes and careful reads: nothing idempo writes is ever half-written.

Every file is written under a temporary name (`.<name>.idempo-<random>.tmp`), synced and renamed into
place; a dir is built under such a name and renamed whole. Where files go is idempo.layout's business.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files are private until given the usual permissions
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK  # what every file and dir of a trial gets


# The temporary names `write_text` and `atomic_dir` give: `.<name>.idempo-<random>.tmp`; before that
# `.<name>.<random>.tmp` (mkstemp's 8 characters), cleaned only where a trial alone writes.
_TEMP_MARK = ".idempo-"
_TEMP_NAME = re.compile(r"^\..+\.idempo-[a-z0-9_]+\.tmp$")
_OLD_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def is_temporary(name: str) -> bool:
    """A name `write_text` or `atomic_dir` gives while writing (or an older idempo's)."""
    return bool(_TEMP_NAME.match(name) or _OLD_TEMP_NAME.match(name))


def write_text(path: Path, text: str) -> None:
    """`text` at `path`, whole or not at all: written to a temporary name, synced, renamed, the rename synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TEMP_MARK}", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json_text(data))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, jsonl_text(rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary dir beside `path`; it becomes `path` only if the block succeeds, with every file
    and dir in it given the usual permissions and synced to disk before the rename (and the rename after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{_TEMP_MARK}", suffix=".tmp"))
    try:
        yield tmp
        settle_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def settle_tree(root: Path) -> None:
    """Every file under `root` mode 0666 & ~umask and every dir 0777 & ~umask (libraries write some files
    through private temporary files: safetensors' weights came out 0600), all synced, dirs after their files."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(directory, name)
            if os.path.islink(file):
                continue
            if stat.S_IMODE(os.stat(file).st_mode) != FILE_MODE:  # a shared stage's hard links are already so
                os.chmod(file, FILE_MODE)
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        if stat.S_IMODE(os.stat(directory).st_mode) != DIR_MODE:
            os.chmod(directory, DIR_MODE)
        fsync_dir(Path(directory))


def fsync_dir(path: Path) -> None:
    """Sync a dir's entries (a rename is durable only once its dir is synced)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's contents, read in 1 MiB blocks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive POSIX lock on `path` (created if missing) for the block; `on_wait` runs first if
    another process holds it. lockf locks hold across the hosts of shared storage (NFS) too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait is not None:
                on_wait()
            fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
