"""Did the trait amplify? The one definition that W&B summaries, the sweep table and reports all use.

The authors' criterion: max over cycles j >= 4 of (score_j - score_0) >= 15 points, score_0 being
M_seed's trait score (cycle 0). Generalised here by `AmplificationConfig`:

- `threshold` and `first_cycle` replace the 15 points and the 4;
- `criterion: ci` also asks that cycle j's 95% interval lies wholly above the seed's interval, so a
  rise that sampling noise could explain does not count;
- `sustained_cycles: k` asks for k consecutive qualifying cycles (k = 1 is the authors' rule).

The input is a trial's history: the `metrics.json` dicts of its completed cycles, any order.
`trial_summary` puts the verdict beside the other per-trial numbers (peak and final trait, minimum
coherence, branching-factor trend, stop reason).
"""

from __future__ import annotations

from idempo.artifacts import SEED_CYCLE
from idempo.config import AmplificationConfig


def amplification(history: list[dict], settings: AmplificationConfig, metric: str = "trait") -> dict:
    """Amplification verdict and the deltas behind it.

    `amplified` is None until the seed cycle and at least one cycle j >= `first_cycle` have finished;
    False means "not so far" for a trial still running. `max_delta` is over the counted cycles only.
    """
    by_cycle = {m["cycle"]: m[metric] for m in history if m.get(metric) and m[metric].get("mean") is not None}
    seed = by_cycle.get(SEED_CYCLE)
    result = {
        "amplified": None,
        "criterion": settings.criterion,
        "seed_score": seed["mean"] if seed else None,
        "max_delta": None,
        "max_delta_cycle": None,
        "final_delta": None,
        "slope": None,
        "first_amplified_cycle": None,
    }
    if seed is None:
        return result
    later = sorted(c for c in by_cycle if c > SEED_CYCLE)
    if later:
        result["final_delta"] = by_cycle[later[-1]]["mean"] - seed["mean"]
        result["slope"] = _slope([SEED_CYCLE, *later], [seed["mean"], *(by_cycle[c]["mean"] for c in later)])
    counted = [c for c in later if c >= settings.first_cycle]
    if not counted:
        return result
    best = max(counted, key=lambda c: (by_cycle[c]["mean"], -c))
    result.update(max_delta=by_cycle[best]["mean"] - seed["mean"], max_delta_cycle=best, amplified=False)
    run = 0
    for cycle in counted:
        run = run + 1 if _qualifies(by_cycle[cycle], seed, settings) else 0
        if run >= settings.sustained_cycles:
            result.update(amplified=True, first_amplified_cycle=cycle - settings.sustained_cycles + 1)
            break
    return result


def trial_summary(history: list[dict], settings: AmplificationConfig, stop_reason: str | None) -> dict:
    """Peak and final trait, amplification, minimum coherence, branching-factor trend, stop reason."""
    cycles = sorted((m for m in history if m["cycle"] >= SEED_CYCLE), key=lambda m: m["cycle"])
    trait = [(m["cycle"], _mean(m, "trait")) for m in cycles if _mean(m, "trait") is not None]
    coherence = [_mean(m, "coherence") for m in cycles if _mean(m, "coherence") is not None]
    bf = [(m["cycle"], _mean(m, "branching_factor")) for m in cycles if _mean(m, "branching_factor") is not None]
    peak = max(trait, key=lambda point: (point[1], -point[0]), default=(None, None))
    verdict = amplification(history, settings)
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


def _qualifies(score: dict, seed: dict, settings: AmplificationConfig) -> bool:
    if score["mean"] - seed["mean"] < settings.threshold:
        return False
    if settings.criterion == "ci":
        low, high = score["ci95"][0], seed["ci95"][1]
        return low is not None and high is not None and low > high
    return True


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of score over cycles (points per cycle)."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
