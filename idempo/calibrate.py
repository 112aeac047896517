"""`idempo calibrate`: the n_seed at which M_seed's trait score reaches a target.

Sweeps compare trials that start from comparable trait strengths (the authors used targets 5, 20, 40,
60 and 80). The score is assumed to grow with n_seed, so a binary search finds the smallest n_seed in
[low, high] whose M_seed scores at least the target; it stops early when a probe lands within
`tolerance` points. The target counts as reached when the closest probe is within `tolerance` of it
(`reached` in calibration.json; `idempo calibrate` exits 1 otherwise). Each probe is an ordinary trial
dir with 0 cycles (`<out>/n_seed-<n>`), so an interrupted calibration resumes and a probe can later be
extended into a full trial.
"""

from __future__ import annotations

from pathlib import Path

from idempo.artifacts import write_json
from idempo.config import ConfigError, ExperimentConfig
from idempo.layout import SEED_CYCLE, calibration_probe, calibration_record
from idempo.loop import run_trial
from idempo.progress import Reporter


def calibrate(
    config: ExperimentConfig,
    target: float,
    out: Path,
    low: int = 1,
    high: int | None = None,
    tolerance: float = 5.0,
    max_probes: int = 8,
    reporter: Reporter | None = None,
) -> dict:
    reporter = reporter or Reporter(enabled=False)
    high = high or config.n_seed
    if not 0 <= target <= 100:
        raise ConfigError([f"--target: got {target:g}; allowed: a trait score in [0, 100]"])
    if not 1 <= low <= high:
        raise ConfigError([f"--low/--high: got {low} and {high}; allowed: 1 <= low <= high"])
    probes: list[dict] = []

    def probe(n: int) -> dict:
        trial = config.model_copy(update={"n_seed": n, "cycles": 0})
        history = run_trial(trial, calibration_probe(out, n), reporter=reporter)
        trait = next(m["trait"] for m in history if m["cycle"] == SEED_CYCLE)
        result = {"n_seed": n, "trait": trait["mean"], "ci95": trait["ci95"], "dir": str(calibration_probe(out, n))}
        probes.append(result)
        reporter.note(
            f"probe {len(probes)}: n_seed {n} -> trait {_num(trait['mean'])} "
            f"[{_num(trait['ci95'][0])}, {_num(trait['ci95'][1])}] (target {target:g})"
        )
        _write(out, target, tolerance, probes)
        return result

    lo, hi = low, high
    while lo < hi and len(probes) < max_probes:
        mid = (lo + hi) // 2
        result = probe(mid)
        if result["trait"] is not None and abs(result["trait"] - target) <= tolerance:
            break
        if result["trait"] is not None and result["trait"] >= target:
            hi = mid
        else:
            lo = mid + 1
    else:
        if len(probes) < max_probes and lo not in {p["n_seed"] for p in probes}:
            probe(lo)
    return _write(out, target, tolerance, probes)


def _write(out: Path, target: float, tolerance: float, probes: list[dict]) -> dict:
    scored = [p for p in probes if p["trait"] is not None]
    best = min(scored, key=lambda p: (abs(p["trait"] - target), p["n_seed"])) if scored else None
    reached = best is not None and abs(best["trait"] - target) <= tolerance
    summary = {
        "target": target,
        "n_seed": best["n_seed"] if best else None,
        "best": best,
        "reached": reached,
        "probes": probes,
    }
    write_json(calibration_record(out), summary)
    return summary


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"
