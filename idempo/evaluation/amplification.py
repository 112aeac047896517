"""Did the trait amplify? The one definition that W&B summaries, the sweep table and reports all use.

score_0 is M_seed's trait score (cycle 0); a cycle j counts when j >= `first_cycle`. The rules
(`delta`, the authors'; `ci`; `test`, the default), their tests, and the false-positive rates that make
`test` the default: docs/metrics.md, "Amplification". `test` corrects for the counted cycles the trial
plans (`planned_cycles`), not those done so far, so a verdict reached at cycle 5 stands at cycle 10.

The input is a trial's history: the `metrics.json` dicts of its completed cycles, any order.
`trial_summary` puts the verdict beside the other per-trial numbers (peak and final trait, minimum
coherence, branching-factor trend, stop reason).
"""

from __future__ import annotations

from idempo.config import AmplificationConfig
from idempo.evaluation.stats import Z95, proportion_rise_p_value, welch_rise_p_value
from idempo.layout import SEED_CYCLE


def rule_in_words(settings: AmplificationConfig) -> str:
    """The rule a verdict was reached by, as the report and W&B show it."""
    rise = f"+{settings.threshold:g} points over M_seed"
    where = f"cycles >= {settings.first_cycle}"
    words = {
        "delta": f"delta: {rise} at one of the {where}",
        "ci": f"ci: {rise} and a 95% CI above the seed's, at one of the {where}",
        "test": f"test: {rise} and one-sided familywise alpha {settings.alpha:g} (Bonferroni) over {where}",
    }[settings.criterion]
    if settings.sustained_cycles > 1:
        words += f", {settings.sustained_cycles} consecutive cycles"
    return words


def amplification(
    history: list[dict], settings: AmplificationConfig, metric: str = "trait", planned_cycles: int | None = None
) -> dict:
    """Amplification verdict, the rule behind it and the deltas.

    `amplified` is None until the seed cycle and a counted cycle have a score (`undecided_reason` says
    what is missing); False means "not so far" for a trial still running. Fields: docs/metrics.md.
    """
    cycles = {m["cycle"]: m.get(metric) for m in history}
    by_cycle = {c: s for c, s in cycles.items() if isinstance(s, dict) and s.get("mean") is not None}
    seed = by_cycle.get(SEED_CYCLE)
    result = {
        "amplified": None,
        "criterion": settings.criterion,
        "rule": rule_in_words(settings),
        "undecided_reason": None,
        "seed_score": seed["mean"] if seed else None,
        "max_delta": None,
        "max_delta_cycle": None,
        "final_delta": None,
        "slope": None,
        "first_amplified_cycle": None,
        "min_p_value": None,
        "alpha_per_cycle": None,
    }
    if seed is None:
        result["undecided_reason"] = (
            f"no seed score (every {metric} answer of M_seed was a refusal)"
            if SEED_CYCLE in cycles
            else "no seed score: M_seed (cycle 0) not evaluated yet"
        )
        return result
    later = sorted(c for c in by_cycle if c > SEED_CYCLE)
    if later:
        result["final_delta"] = by_cycle[later[-1]]["mean"] - seed["mean"]
        result["slope"] = _slope([SEED_CYCLE, *later], [seed["mean"], *(by_cycle[c]["mean"] for c in later)])
    counted = [c for c in later if c >= settings.first_cycle]
    if not counted:
        reached = [c for c in cycles if c >= settings.first_cycle]
        last = max(cycles)
        result["undecided_reason"] = (
            f"no {metric} score at the counted cycles (>= {settings.first_cycle}): every answer was a refusal"
            if reached
            else f"the rule's counted cycles (>= {settings.first_cycle}) not reached: last cycle {last}"
        )
        return result
    best = max(counted, key=lambda c: (by_cycle[c]["mean"], -c))
    result.update(max_delta=by_cycle[best]["mean"] - seed["mean"], max_delta_cycle=best)
    if settings.criterion == "test":
        p_values = {c: rise_p_value(by_cycle[c], seed) for c in counted}
        untestable = [c for c, p in p_values.items() if p is None]
        if untestable:
            which = SEED_CYCLE if _untestable(seed) else untestable[0]
            result["undecided_reason"] = (
                f"cycle {which}'s {metric} has no standard error or 95% interval to test a rise with"
            )
            return result
        looks = max(len(counted), (planned_cycles or 0) - settings.first_cycle + 1)
        alpha = settings.alpha / looks
        result.update(min_p_value=min(p_values.values()), alpha_per_cycle=alpha)
    result["amplified"] = False
    run = 0
    for cycle in counted:
        qualifies = by_cycle[cycle]["mean"] - seed["mean"] >= settings.threshold
        if settings.criterion == "ci":
            qualifies &= _interval_above(by_cycle[cycle], seed)
        elif settings.criterion == "test":
            qualifies &= p_values[cycle] <= alpha
        run = run + 1 if qualifies else 0
        if run >= settings.sustained_cycles:
            result.update(amplified=True, first_amplified_cycle=cycle - settings.sustained_cycles + 1)
            break
    return result


def rise_p_value(score: dict, seed: dict) -> float | None:
    """One-sided p-value of score - seed > 0 from two metrics.json summaries; None when one of them
    carries neither a standard error nor an interval."""
    shares = _share(score), _share(seed)
    if None not in shares:
        (p_later, n_later, deff_later), (p_before, n_before, deff_before) = shares
        return proportion_rise_p_value(p_later, n_later, p_before, n_before, max(deff_later, deff_before))
    spread = _spread(score), _spread(seed)
    if None in spread:
        return None
    (se_later, df_later), (se_before, df_before) = spread
    return welch_rise_p_value(score["mean"] - seed["mean"], se_later, df_later, se_before, df_before)


def _untestable(summary: dict) -> bool:
    return _share(summary) is None and _spread(summary) is None


def _share(summary: dict) -> tuple[float, int, float] | None:
    """(share in [0, 1], answers, design effect) of a marker summary; None for a continuous score.
    Summaries written before clustering count every answer as independent (design effect 1)."""
    if summary.get("deff") is not None and summary.get("n"):
        return summary["mean"] / 100.0, summary["n"], summary["deff"]
    if summary.get("judge") == "marker" and summary.get("n"):
        return summary["mean"] / 100.0, summary["n"], 1.0
    return None


def _spread(summary: dict) -> tuple[float, float] | None:
    """(standard error, degrees of freedom) of a continuous summary."""
    df = summary.get("df") or max(1, (summary.get("n") or 2) - 1)
    if summary.get("se") is not None:
        return summary["se"], df
    low, high = summary.get("ci95") or (None, None)
    if low is None or high is None:
        return None
    return (high - low) / (2 * Z95), df  # written before standard errors: a normal-approximation interval


def trial_summary(
    history: list[dict], settings: AmplificationConfig, stop_reason: str | None, planned_cycles: int | None = None
) -> dict:
    """Peak and final trait, amplification, minimum coherence, branching-factor trend, stop reason;
    `planned_cycles` is the trial's `cycles` (the number of looks the verdict's test corrects for)."""
    cycles = sorted((m for m in history if m["cycle"] >= SEED_CYCLE), key=lambda m: m["cycle"])
    trait = [(m["cycle"], _mean(m, "trait")) for m in cycles if _mean(m, "trait") is not None]
    coherence = [_mean(m, "coherence") for m in cycles if _mean(m, "coherence") is not None]
    bf = [(m["cycle"], _mean(m, "branching_factor")) for m in cycles if _mean(m, "branching_factor") is not None]
    peak = max(trait, key=lambda point: (point[1], -point[0]), default=(None, None))
    verdict = amplification(history, settings, planned_cycles=planned_cycles)
    return {
        "peak_trait": peak[1],
        "peak_cycle": peak[0],
        "final_trait": trait[-1][1] if trait else None,
        "min_coherence": min(coherence, default=None),
        "final_coherence": coherence[-1] if coherence else None,
        "bf_seed": bf[0][1] if bf and bf[0][0] == SEED_CYCLE else None,
        "bf_final": bf[-1][1] if bf else None,
        "bf_slope": _slope([c for c, _ in bf], [v for _, v in bf]),
        "cycles_done": max((m["cycle"] for m in history), default=None),
        "stop_reason": stop_reason,
        **{f"amplification/{k}": v for k, v in verdict.items()},
        "amplified": verdict["amplified"],
    }


def _mean(metrics: dict, name: str) -> float | None:
    value = metrics.get(name)
    return value.get("mean") if isinstance(value, dict) else None


def _interval_above(score: dict, seed: dict) -> bool:
    low, high = (score.get("ci95") or [None, None])[0], (seed.get("ci95") or [None, None])[1]
    return low is not None and high is not None and low > high


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of score over cycles (points per cycle)."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
