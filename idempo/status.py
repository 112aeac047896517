"""`idempo status`: where each trial of a sweep (or one `idempo run` dir) is, read from its artifacts only.

A trial is pending (Tune has not started it: no config.yaml yet), running at a stage and phase (the
trial's progress.json, or else what the stage has written so far), interrupted (not done, and the process
progress.json names is gone: seen only on that process's machine; elsewhere such a trial shows as
running), stopped (stopped.json, with why), failed (Tune's error.txt of the trial is newer than its last
progress; a failed trial that Tune retried and that runs again is running), or done (every planned cycle
complete). Nothing here asks Ray: it works on a sweep's storage from any machine that mounts it, while
the sweep runs and after.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from idempo.artifacts import read_json
from idempo.config import ConfigError
from idempo.layout import INIT_CYCLE, SEED_CYCLE, SweepLayout, TrialLayout, read_trial
from idempo.progress import HEADER, summary_line
from idempo.timeline import busy_share, read_phases

STATES = ("running", "pending", "interrupted", "failed", "stopped", "done")
WIDTH = 100
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*: \S")  # 'RuntimeError: ...' (not a traceback's indented lines)


@dataclass(frozen=True)
class TrialState:
    name: str
    state: str  # one of STATES
    cycle: int | None  # running: the stage it is in; otherwise the last complete one
    cycles: int  # planned
    detail: str  # the phase and for how long, why it stopped, or its first error line
    trait: float | None  # the last complete stage's trait score


def trial_states(directory: Path, now: float | None = None) -> list[TrialState]:
    """Every trial of the sweep at `directory`, in the sweep's order (sweep.json), or the one trial there."""
    sweep = SweepLayout(directory)
    now = time.time() if now is None else now
    if sweep.record.exists():
        record = read_json(sweep.record)
        configs = record.get("configs") or {}
        tune = sweep.tune_trials()
        return [
            trial_state(sweep.trial(name), (configs.get(name) or {}).get("cycles"), tune.get(name), now)
            for name in record["trials"]
        ]
    if TrialLayout(directory).config.exists():
        return [trial_state(Path(directory), None, None, now)]
    raise ConfigError(
        [f"{directory}: no sweep.json (a sweep writes it as it starts) and no config.yaml (a trial dir's)"]
    )


def gpu_busy_shares(directory: Path) -> dict[str, float | None]:
    """Each GPU's busy share over a sweep's trials (`idempo.timeline.busy_share` of the trials that ran on it),
    by '<node id>:<GPU id>', from each trial's placement.json (its last run's GPUs) and timeline.json."""
    trials = SweepLayout(directory).trials
    by_gpu: dict[str, list[list[dict]]] = {}
    for trial in sorted(trials.iterdir()) if trials.is_dir() else []:
        layout = TrialLayout(trial)
        placement = read_json(layout.placement) if layout.placement.is_file() else {}
        for gpu in placement.get("gpu_ids") or []:
            by_gpu.setdefault(f"{placement.get('node')}:{gpu}", []).append(read_phases(layout.timeline))
    return {gpu: busy_share(timelines) for gpu, timelines in sorted(by_gpu.items())}


def trial_state(directory: Path, cycles: int | None, tune_dir: Path | None, now: float) -> TrialState:
    trial = read_trial(directory)
    layout = TrialLayout(directory)
    cycles = trial.planned_cycles if cycles is None else cycles
    last = trial.last_cycle
    trait = trial.history[-1]["trait"]["mean"] if trial.history else None

    def state(name: str, detail: str = "", cycle: int | None = last) -> TrialState:
        return TrialState(trial.name, name, cycle, cycles, detail, trait)

    if trial.stopped:
        return state("stopped", trial.stopped.get("reason", ""))
    if last is not None and last >= cycles:
        return state("done")
    error = failure(tune_dir, layout)
    if error is not None:
        return state("failed", error)
    if not trial.config:
        return state("pending")
    running = INIT_CYCLE if last is None else last + 1
    progress = read_json(layout.progress) if layout.progress.exists() else {}
    if progress.get("host") == socket.gethostname() and not alive(progress.get("pid")):
        return state("interrupted", "nothing runs it now: run it again (a sweep: --resume)")
    if progress.get("cycle") == running:
        return state("running", f"{progress['phase']} for {age(now - progress['since'])}", running)
    return state("running", phase_on_disk(layout, running), running)


def alive(pid: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, TypeError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def phase_on_disk(layout: TrialLayout, cycle: int) -> str:
    """The phase a stage is in, from the files it has written so far (a trial without progress.json)."""
    if cycle == INIT_CYCLE or layout.train_stats(cycle).exists():
        return "evaluating"
    return "training" if layout.data(cycle).exists() else "sampling"


def failure(tune_dir: Path | None, layout: TrialLayout) -> str | None:
    """The first line of the trial's last failure, unless the trial has made progress since (a retry)."""
    if tune_dir is None or not SweepLayout.tune_error(tune_dir).exists():
        return None
    error = SweepLayout.tune_error(tune_dir)
    if layout.progress.exists() and layout.progress.stat().st_mtime > error.stat().st_mtime:
        return None
    refusal = SweepLayout.config_error(tune_dir)
    if refusal.exists():
        return "; ".join(read_json(refusal)["problems"])
    last = error.read_text(errors="replace").rpartition("Failure # ")[2].splitlines()[1:]
    named = [line for line in last if _EXCEPTION.match(line)]
    lines = named or [line for line in last if line.strip()] or ["(no message)"]
    return lines[-1].strip()


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def stage_name(cycle: int | None, cycles: int) -> str:
    """'init/6', 'seed/6', '3/6': a stage of the planned cycles."""
    if cycle is None:
        return "-"
    name = {INIT_CYCLE: "init", SEED_CYCLE: "seed"}.get(cycle, str(cycle))
    return f"{name}/{cycles}"


def render(directory: Path, now: float | None = None) -> tuple[str, list[TrialState]]:
    """One line per trial (at most WIDTH columns) and a count per state; a single trial's dir also gets its
    cycle lines, as `idempo run` printed them."""
    states = trial_states(Path(directory), now)
    stages = [stage_name(s.cycle, s.cycles) for s in states]
    width = max(5, min(max(len(s.name) for s in states), 40))
    kind, stage = max(5, *(len(s.state) for s in states)), max(5, *map(len, stages))
    lines = [f"{'#':>3} {'trial':<{width}} {'state':<{kind}} {'stage':>{stage}} {'trait':>5}  phase, reason or error"]
    for number, (s, at) in enumerate(zip(states, stages, strict=True), 1):
        name = s.name if len(s.name) <= width else s.name[: width - 1] + "~"
        trait = "-" if s.trait is None else f"{s.trait:.1f}"
        line = f"{number:>3} {name:<{width}} {s.state:<{kind}} {at:>{stage}} {trait:>5}  {s.detail}"
        lines.append(line.rstrip() if len(line) <= WIDTH else line[: WIDTH - 3] + "...")
    counts = [f"{sum(s.state == name for s in states)} {name}" for name in STATES]
    total = f"{len(states)} trial" + ("s" if len(states) != 1 else "")
    lines.append(f"{total}: " + ", ".join(c for c in counts if not c.startswith("0 ")))
    if not SweepLayout(directory).record.exists():
        history = read_trial(Path(directory)).history
        lines += [HEADER, *(summary_line(metrics) for metrics in history)] if history else []
    return "\n".join(lines), states


def settled(states: list[TrialState]) -> bool:
    """Nothing left to watch: no trial pending or running (an interrupted one waits for a command)."""
    return not any(s.state in ("pending", "running") for s in states)
