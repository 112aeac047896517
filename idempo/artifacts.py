"""The on-disk layout of a trial, and atomic writes (nothing written is ever half-written).

    <trial>/config.yaml             the resolved config
    <trial>/cycles/init/            M_init's evaluation (cycle -1)
    <trial>/cycles/000-seed/        data.jsonl  adapter/  eval.jsonl  metrics.json
    <trial>/cycles/001/             samples.jsonl  adapter/  eval.jsonl  metrics.json
    <trial>/initial-answers.jsonl   M_init's answers to training prompts (preference regimes)

Every file is written under a temporary name and renamed into place; a cycle is complete when its
metrics.json exists, and a resumed trial reuses whatever a cycle already finished.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

INIT_CYCLE, SEED_CYCLE = -1, 0
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files are private until given the usual permissions


# Config fields a trial may change between runs: they do not change what the trial has written.
_JUDGES = ("evaluation.judge", "evaluation.coherence_judge", "preference.reward_judge")
# Settings a trial may resume under: they change no artifact (where a key is read from, when a judge's
# refusals stop the run: a trial stopped by them resumes once the limit or the file is fixed).
RESUMABLE_CHANGES = {
    "cycles",
    "evaluation.amplification",
    "seeding.teacher.api_key_file",
    *(f"{judge}.{name}" for judge in _JUDGES for name in ("max_refusal_rate", "api_key_file")),
}


class TrialConflict(RuntimeError):
    """The output dir holds a trial with another config, or another process is running it."""


class TrialLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        # M_init's answers, by prompt: the rejected side of preference pairs, written once per trial
        self.initial_answers = self.root / "initial-answers.jsonl"

    def cycle_dir(self, cycle: int) -> Path:
        name = {INIT_CYCLE: "init", SEED_CYCLE: "000-seed"}.get(cycle, f"{cycle:03d}")
        return self.root / "cycles" / name

    @staticmethod
    def cycle_of(directory: str | Path) -> int | None:
        """The cycle a cycle dir belongs to ('init' -1, '000-seed' 0, '003' 3), None for other dirs."""
        name = Path(directory).name
        if name in ("init", "000-seed"):
            return INIT_CYCLE if name == "init" else SEED_CYCLE
        return int(name) if name.isdigit() else None

    def data(self, cycle: int) -> Path:
        """The training data of a cycle: D_seed for the seed, the samples of M_{j-1} after it."""
        return self.cycle_dir(cycle) / ("data.jsonl" if cycle == SEED_CYCLE else "samples.jsonl")

    def weights(self, cycle: int, finetune: str) -> Path:
        return self.cycle_dir(cycle) / ("adapter" if finetune == "lora" else "model")

    def eval(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "eval.jsonl"

    def metrics(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "metrics.json"

    def is_complete(self, cycle: int) -> bool:
        return self.metrics(cycle).is_file()

    def check(self, config: dict[str, Any]) -> None:
        """Fail if this dir holds a trial with another config (RESUMABLE_CHANGES aside: more `cycles`
        extend it, the amplification rule only reads what it wrote, and a judge's refusal limit or key
        file changes nothing it wrote)."""
        if not self.config.exists():
            return
        changed = _differences(yaml.safe_load(self.config.read_text()), config, ignore=RESUMABLE_CHANGES)
        if changed:
            raise TrialConflict(
                f"{self.root} holds a trial with another config ({'; '.join(changed)}); "
                "use another --out dir, or the same config to resume"
            )

    def claim(self, config: dict[str, Any]) -> None:
        """Take the trial dir for this process, clear what a killed run left half-written, write the config."""
        self.check(config)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".lock", "a")  # held until the process exits; "a" leaves it untouched
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrialConflict(f"{self.root} is being run by another process") from None
        for leftover in self.root.rglob(".*.tmp"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        text = yaml.safe_dump(config, sort_keys=False)
        if not (self.config.exists() and self.config.read_text() == text):
            write_text(self.config, text)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary dir beside `path`; it becomes `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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


def _differences(old: Any, new: Any, ignore: set[str], prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for key in sorted(set(old) | set(new)):
            # a key the stored config lacks was added to idempo after the trial began: its default keeps
            # the trial as it was, so resuming it is not a change
            if f"{prefix}{key}" in ignore or key not in old:
                continue
            changed += _differences(old.get(key), new.get(key), ignore, f"{prefix}{key}.")
        return changed
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
