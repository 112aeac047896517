"""The report's tables: a summary per axis value, one row per trial, one per replica group, one per (trial, cycle)."""

from __future__ import annotations

import csv
import io
from statistics import median
from typing import Any

from idempo.evaluation.amplification import trial_summary
from idempo.evaluation.stats import mean_ci
from idempo.layout import SEED_CYCLE
from idempo.report.results import SweepResults, TrialResult, lowest
from idempo.tracking import flatten

FINISHED = ("complete", "stopped")
SUMMARY_COLUMNS = ("peak_trait", "peak_cycle", "final_trait", "min_coherence", "bf_seed", "bf_final", "bf_slope")


def trial_rows(results: SweepResults, amplification: dict[str, Any] | None = None) -> list[dict]:
    """Per trial: status, the trait's seed/peak/final, its largest rise at the verdict's counted cycles,
    minimum coherence, BF trend, lowest BF and distinct-2, the verdict, the rule that gave it and, when
    undecided, why."""
    return [_trial_row(trial, results, amplification) for trial in results.trials]


def _trial_row(trial: TrialResult, results: SweepResults, amplification: dict[str, Any] | None) -> dict:
    stop_reason = (trial.stopped or {}).get("reason")
    settings = trial.amplification_settings(amplification)
    summary = trial_summary(trial.history, settings, stop_reason, trial.planned_cycles)
    done = trial.last_cycle
    return {
        "trial": trial.name,
        **{axis: trial.axes.get(axis) for axis in results.axes},
        "status": trial.status,
        "cycles": f"{'-' if done is None else max(done, 0)}/{trial.planned_cycles}",
        "seed_trait": summary["amplification/seed_score"],
        **{key: summary[key] for key in SUMMARY_COLUMNS},
        "min_bf": lowest(trial, "branching_factor"),
        "min_distinct_2": lowest(trial, "degeneration.distinct_2"),
        "max_rise": summary["amplification/max_delta"],
        "amplified": summary["amplified"],
        "first_amplified_cycle": summary["amplification/first_amplified_cycle"],
        "min_p_value": summary["amplification/min_p_value"],
        "undecided_because": summary["amplification/undecided_reason"],
        "amplification_rule": summary["amplification/rule"],
        "m_seed": seed_stage(trial),
        "stop_reason": stop_reason,
    }


def summary_rows(results: SweepResults, trials: list[dict]) -> list[dict]:
    """Per value of each varying axis, after a row of all trials: how many trials; amplified k/n (k of the
    n with a verdict); the median over trials of the last completed cycle's trait minus M_seed's; the
    lowest coherence reached (cycles >= 0), and where some trial has no coherence judge, the lowest
    branching factor and distinct-2 too."""
    groups = [("all", "", trials)]
    for axis, values in results.varying().items():
        groups += [(axis, value, [row for row in trials if row[axis] == value]) for value in values]
    configured = {t.name: t.value("evaluation.coherence_judge") is not None for t in results.trials}
    judge = {row["trial"]: configured[row["trial"]] or row["min_coherence"] is not None for row in trials}
    rows = []
    for axis, value, members in groups:
        decided = [row["amplified"] for row in members if row["amplified"] is not None]
        changes = _changes(members, "seed_trait", "final_trait")
        coherence = [row["min_coherence"] for row in members if row["min_coherence"] is not None]
        row = {
            "axis": axis,
            "value": value,
            "trials": len(members),
            "amplified": f"{sum(decided)}/{len(decided)}",
            "median_final_minus_seed": median(changes) if changes else None,
            "lowest_coherence": min(coherence, default=None),
        }
        if not any(judge[r["trial"]] for r in members):
            row["lowest_coherence"] = "no judge"
        if not all(judge.values()):
            for key in ("min_bf", "min_distinct_2"):
                row[key.replace("min", "lowest")] = min((r[key] for r in members if r[key] is not None), default=None)
        rows.append(row)
    return rows


def seed_stage(trial: TrialResult) -> str | None:
    """Where the trial's M_seed comes from: trained here (alone, or for the trials that share it) or
    taken from the trial that trained it (idempo.shared); None before the seed stage has finished."""
    seed = next((m for m in trial.history if m["cycle"] == SEED_CYCLE), None)
    if seed is None:
        return None
    shared = seed.get("shared")
    if shared is None:
        return "trained here"
    return f"shared, from {shared['origin']}" if shared["reused"] else "trained here, shared"


def replica_rows(results: SweepResults, trials: list[dict]) -> list[dict]:
    """Per configuration: how many replicas, mean final and peak trait across the finished ones (complete
    or stopped: a running trial's last cycle is not its final one), the final trait's change from M_seed
    and the branching factor's, each with its 95% t-interval across replicas (none for a single one),
    amplified count."""
    by_name = {row["trial"]: row for row in trials}
    rows = []
    for key, members in results.replica_groups().items():
        own = [by_name[t.name] for t in members if by_name[t.name]["status"] in FINISHED]
        final = mean_ci([r["final_trait"] for r in own if r["final_trait"] is not None])
        peak = mean_ci([r["peak_trait"] for r in own if r["peak_trait"] is not None])
        trait_change = mean_ci(_changes(own, "seed_trait", "final_trait"))
        bf_change = mean_ci(_changes(own, "bf_seed", "bf_final"))
        decided = [r["amplified"] for r in own if r["amplified"] is not None]
        rows.append(
            {
                **dict(key),
                "replicas": len(members),
                "complete": len(own),
                "final_trait": final["mean"],
                "final_trait_ci95": _interval(final),
                "peak_trait": peak["mean"],
                "final_minus_seed": trait_change["mean"],
                "final_minus_seed_ci95": _interval(trait_change),
                "bf_final_minus_seed": bf_change["mean"],
                "bf_final_minus_seed_ci95": _interval(bf_change, 2),
                "amplified": f"{sum(decided)}/{len(decided)}" if decided else None,
            }
        )
    return rows


def _changes(rows: list[dict], start: str, end: str) -> list[float]:
    """Each trial's `end` minus its `start`, where both were measured."""
    return [r[end] - r[start] for r in rows if r[end] is not None and r[start] is not None]


def cycle_rows(results: SweepResults) -> list[dict]:
    """Every metric of every completed cycle, flattened ('trait/mean', 'trait/ci95_low', ...)."""
    rows = []
    for trial in results.trials:
        for metrics in trial.history:
            flat = flatten({k: v for k, v in metrics.items() if k != "cycle"})
            rows.append({"trial": trial.name, **trial.axes, "status": trial.status, "cycle": metrics["cycle"], **flat})
    return rows


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _interval(aggregate: dict, digits: int = 1) -> str | None:
    low, high = aggregate["ci95"]
    return None if low is None else f"[{low:.{digits}f}, {high:.{digits}f}]"
