"""The on-disk layout of a trial, and atomic writes (nothing written is ever half-written).

    <trial>/config.yaml             the resolved config
    <trial>/cycles/init/            M_init's evaluation (cycle -1)
    <trial>/cycles/000-seed/        data.jsonl  adapter/  train.json  eval.jsonl  metrics.json  manifest.json
    <trial>/cycles/001/             samples.jsonl  adapter/  train.json  eval.jsonl  metrics.json  manifest.json
    <trial>/initial-answers.jsonl   M_init's answers to training prompts (preference regimes)
    <trial>/.lock                   held by the process running the trial

Every file is written under a temporary name (`.<name>.idempo-<random>.tmp`) and renamed into place; a
cycle is complete when its metrics.json exists, and a resumed trial reuses whatever a cycle already
finished, after checking it against the record its dir's manifest.json keeps of it (idempo.records).
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

import yaml

from idempo.config import ENDPOINT_PACE, endpoint_sections

INIT_CYCLE, SEED_CYCLE = -1, 0
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporary files are private until given the usual permissions
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK  # what every file and dir of a trial gets


# Config fields a trial may change between runs: they do not change what the trial has written or will
# write. Besides these, every endpoint section's pace, key source, refusal limit and prices
# (`ENDPOINT_PACE`) and every cache location (`cache_dir`) may change: see `resumable`.
RESUMABLE_CHANGES = {"cycles", "evaluation.amplification"}
CACHE_LOCATIONS = {"cache_dir"}
ENDPOINT_SECTIONS = endpoint_sections()

# The temporary names `write_text` and `atomic_dir` give: `.<name>.idempo-<random>.tmp`; before that
# `.<name>.<random>.tmp` (mkstemp's 8 characters), cleaned only where a trial alone writes.
_TEMP_MARK = ".idempo-"
_TEMP_NAME = re.compile(r"^\..+\.idempo-[a-z0-9_]+\.tmp$")
_OLD_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_LOCK = ".lock"


class TrialConflict(RuntimeError):
    """The output dir holds a trial with another config, another process is running it, or it holds
    something that is not a trial."""


def resumable(field: str) -> bool:
    """Whether the dotted config `field` may change when a trial resumes: it cannot change what is written.
    An endpoint's concurrency, timeout, retries, backoff, key variable and prices change how hard it is
    leaned on and what the cost report says, never its answers; a cache location changes where answers are
    kept, not what they are."""
    section, _, name = field.rpartition(".")
    return (
        field in RESUMABLE_CHANGES
        or name in CACHE_LOCATIONS
        or (section in ENDPOINT_SECTIONS and name in ENDPOINT_PACE)
    )


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
        """Fail if this dir holds a trial with another config (`resumable` fields aside: more `cycles`
        extend it, and the amplification rule only reads what it wrote), or holds anything but a trial."""
        if not self.config.exists():
            foreign = self._foreign_entries()
            if foreign:
                shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} entries)" if len(foreign) > 5 else "")
                raise TrialConflict(
                    f"--out {self.root} is not empty and holds no trial (no config.yaml): {shown}; "
                    "use an empty or new dir, or the dir of a trial to resume it"
                )
            return
        try:
            stored = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise TrialConflict(
                f"{self.config}: not YAML ({err}); it is the config of the trial in {self.root}"
            ) from None
        changed = config_differences(stored, config)
        if changed:
            raise TrialConflict(
                f"{self.root} holds a trial with another config ({'; '.join(changed)}); "
                "use another --out dir, or the same config to resume"
            )

    def claim(self, config: dict[str, Any]) -> None:
        """Take the trial dir for this process (the lock first, so a second process is refused before it
        does anything), compare the configs, clear what a killed run left half-written, write the config.
        A dir this call created is removed again when a check fails (`release_fresh`)."""
        created = _missing_parents(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        lock_existed = (self.root / _LOCK).exists()
        self._lock = open(self.root / _LOCK, "a")  # held until the process exits; "a" leaves it untouched
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise TrialConflict(f"{self.root} is being run by another process") from None
        self._fresh = [*created, *([] if lock_existed else [self.root / _LOCK])]
        try:
            self.check(config)
        except TrialConflict:
            self.release_fresh()
            self._lock.close()
            raise
        fresh_config = not self.config.exists()
        self.clean_temporary()
        text = yaml.safe_dump(config, sort_keys=False)
        if not (self.config.exists() and self.config.read_text() == text):
            write_text(self.config, text)
        if fresh_config:
            self._fresh.append(self.config)

    def release_fresh(self) -> None:
        """Undo what `claim` created in a dir that held no trial (a failure before the trial wrote anything
        else, e.g. a model that does not load): the next run starts as if this one never did."""
        for path in reversed(getattr(self, "_fresh", [])):
            if path == self.config or path.name == _LOCK:
                path.unlink(missing_ok=True)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        self._fresh = []

    def owned_dirs(self) -> list[Path]:
        """The dirs only this trial writes into: its root, cycles/ and each cycle dir (not reeval/ or
        anything else a user put there)."""
        cycles = self.root / "cycles"
        dirs = [self.root, cycles]
        if cycles.is_dir():
            dirs += sorted(d for d in cycles.iterdir() if d.is_dir() and self.cycle_of(d) is not None)
        return [d for d in dirs if d.is_dir()]

    def clean_temporary(self) -> None:
        """Remove what a killed run left half-written: idempo's own temporary names, in the trial's own dirs."""
        for directory in self.owned_dirs():
            for leftover in directory.iterdir():
                if _TEMP_NAME.match(leftover.name) or _OLD_TEMP_NAME.match(leftover.name):
                    shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()

    def redo_hint(self, path: Path) -> str:
        """How to redo what `path` belongs to: its cycle dir, and every later one (they build on it)."""
        cycles = self.root / "cycles"
        try:
            relative = Path(path).relative_to(cycles)
        except ValueError:  # a file of the trial root: M_init's answers, which every stage after M_init's reads
            later = [d for d in self.owned_dirs()[2:] if self.cycle_of(d) != INIT_CYCLE]
            return (
                f"delete {path} and the cycles that read it ({', '.join(map(str, later)) or 'none yet'}) to redo them"
            )
        directory = cycles / relative.parts[0]
        cycle = self.cycle_of(directory)
        if cycle == INIT_CYCLE:
            return f"delete {directory} to redo M_init's evaluation (cycle -1)"
        later = [d for d in self.owned_dirs()[2:] if self.cycle_of(d) > cycle]
        hint = f"delete {directory} to redo cycle {cycle}"
        if later:
            hint += f"; later cycles, which build on it, must be deleted too: {', '.join(map(str, later))}"
        return hint

    def _foreign_entries(self) -> list[str]:
        """What a dir without config.yaml holds besides the lock and idempo's temporary files."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.name != _LOCK and not (_TEMP_NAME.match(p.name) or _OLD_TEMP_NAME.match(p.name))
        )


def _missing_parents(path: Path) -> list[Path]:
    """The dirs `path.mkdir(parents=True)` would create, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing[::-1]


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


def config_differences(old: Any, new: Any, allowed: Callable[[str], bool] = resumable, prefix: str = "") -> list[str]:
    """'field: old -> new' for every field that differs, except the dotted fields `allowed` accepts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = []
        for key in sorted(set(old) | set(new)):
            # a key the stored config lacks was added to idempo after the trial began: its default keeps
            # the trial as it was, so resuming it is not a change
            if allowed(f"{prefix}{key}") or key not in old:
                continue
            changed += config_differences(old.get(key), new.get(key), allowed, f"{prefix}{key}.")
        return changed
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
