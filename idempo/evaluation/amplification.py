"""Did the trait amplify? The one definition that the stopper, W&B summaries and reports all use.

The authors' criterion: max over cycles j >= 4 of (score_j - score_0) >= 15 points, score_0 being
M_seed's trait score (cycle 0). Generalised here by `AmplificationConfig`:

- `threshold` and `first_cycle` replace the 15 points and the 4;
- `criterion: ci` also asks that cycle j's 95% interval lies wholly above the seed's interval, so a
  rise that sampling noise could explain does not count;
- `sustained_cycles: k` asks for k consecutive qualifying cycles (k = 1 is the authors' rule).

The input is a trial's history: the `metrics.json` dicts of its completed cycles, any order.
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
