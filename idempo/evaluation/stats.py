"""Aggregates with 95% confidence intervals, and the tests behind the amplification verdict (pure functions).

Intervals are over the independent units: replicas across trials (`mean_ci`), eval prompts as clusters
within a trial (`clustered_*`); docs/metrics.md, "Confidence intervals". "No interval" is
`ci95: [None, None]`, the shape metrics.json has always used, never a zero-width interval. Student's t
is computed here, without scipy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from functools import lru_cache
from statistics import NormalDist

_NORMAL = NormalDist()
Z95 = _NORMAL.inv_cdf(0.975)
NO_INTERVAL = (None, None)


# -- the Student-t distribution ------------------------------------------------------------------------


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by the continued fraction of Numerical Recipes (6.4), on the side where it converges fast."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """Modified Lentz evaluation of the incomplete beta continued fraction."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return result
    return result


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (any real df > 0; math.inf: the normal)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if math.isinf(df) or df > 1e7:
        return _NORMAL.cdf(t)
    tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t > 0 else tail


def _student_t_pdf(t: float, df: float) -> float:
    log_density = (
        math.lgamma((df + 1) / 2)
        - math.lgamma(df / 2)
        - 0.5 * math.log(df * math.pi)
        - (df + 1) / 2 * math.log1p(t * t / df)
    )
    return math.exp(log_density)


@lru_cache(maxsize=4096)
def student_t_quantile(p: float, df: float) -> float:
    """t such that P(T <= t) = p: Newton steps from the normal quantile, kept inside a shrinking bracket."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(df) or df > 1e7:
        return _NORMAL.inv_cdf(p)
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, high * 2
    t = min(max(_NORMAL.inv_cdf(p), low), high)
    for _ in range(200):
        error = student_t_cdf(t, df) - p
        if abs(error) < 1e-15 or high - low < 1e-13 * t:
            break
        if error > 0:
            high = t
        else:
            low = t
        step = t - error / _student_t_pdf(t, df)
        t = step if low < step < high else (low + high) / 2
    return t


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t): the one-sided p-value of a t statistic."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    return student_t_cdf(-t, df)


def normal_upper_tail(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    if math.isinf(z):
        return 0.0 if z > 0 else 1.0
    return 1.0 - _NORMAL.cdf(z)


# -- across replicas: independent means -----------------------------------------------------------------


def mean_ci(values: Sequence[float]) -> dict:
    """Mean with a Student-t 95% interval, n-1 degrees of freedom: for independent values (one per
    replica). Fewer than two values have no interval."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": list(NO_INTERVAL), "n": 0, "se": None}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": list(NO_INTERVAL), "n": 1, "se": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = student_t_quantile(0.975, n - 1) * se
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "se": se}


# -- within a trial: answers clustered by prompt ---------------------------------------------------------


def cluster_variance_of_mean(values: Sequence[float], clusters: Sequence[Hashable], mean: float) -> tuple[float, int]:
    """Cluster-robust variance of a mean of `values` and the number of clusters G.

    CR1 (Liang & Zeger with the usual G/(G-1) finite-cluster factor): G/(G-1) sum_g e_g^2 / n^2, with
    e_g the sum of the cluster's residuals. With one value per cluster it is s^2 / n.
    """
    residuals: dict[Hashable, float] = defaultdict(float)
    for value, cluster in zip(values, clusters, strict=True):
        residuals[cluster] += value - mean
    g = len(residuals)
    if g < 2:
        return math.nan, g
    n = len(values)
    return g / (g - 1) * sum(e * e for e in residuals.values()) / (n * n), g


def clustered_mean(values: Sequence[float], clusters: Sequence[Hashable]) -> dict:
    """Mean of continuous scores with a cluster-robust 95% t-interval, G-1 degrees of freedom.

    With a single cluster (one prompt) the between-prompt variance cannot be estimated: the interval is
    then over that prompt's answers, taken as independent (n-1 degrees of freedom)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": list(NO_INTERVAL), "n": 0, "se": None, "clusters": 0, "df": None}
    mean = sum(values) / n
    variance, g = cluster_variance_of_mean(values, clusters, mean)
    df = g - 1
    if g < 2:
        if n < 2:
            return {"mean": mean, "ci95": list(NO_INTERVAL), "n": n, "se": None, "clusters": g, "df": None}
        variance, df = sum((v - mean) ** 2 for v in values) / (n - 1) / n, n - 1
    se = math.sqrt(variance)
    half = student_t_quantile(0.975, df) * se
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "se": se, "clusters": g, "df": df}


def wilson_interval(p: float, n: float) -> tuple[float, float]:
    """Wilson 95% interval of a proportion p observed in n (possibly effective, non-integer) trials.
    Inside [0, 1] and not empty at p = 0 or 1."""
    z2 = Z95 * Z95
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    low = 0.0 if p <= 0 else max(0.0, centre - half)
    high = 1.0 if p >= 1 else min(1.0, centre + half)
    return low, high


def clustered_proportion(hits: Sequence[bool], clusters: Sequence[Hashable], scale: float = 1.0) -> dict:
    """Share of hits with a Wilson 95% interval at the effective sample size n / deff.

    deff = clustered variance of the share / p(1-p)/n, never below 1: a negative within-prompt
    correlation from a dozen prompts is mostly noise and must not narrow the interval. deff is 1 at
    p = 0 or 1 and with one cluster. `se` is sqrt(deff p(1-p)/n), on the same scale as `mean`.
    """
    n = len(hits)
    if n == 0:
        return {"mean": None, "ci95": list(NO_INTERVAL), "n": 0, "se": None, "clusters": 0, "deff": None, "n_eff": None}
    p = sum(bool(h) for h in hits) / n
    independent = p * (1 - p) / n
    clustered, g = cluster_variance_of_mean([float(bool(h)) for h in hits], clusters, p)
    deff = max(1.0, clustered / independent) if independent > 0 and g >= 2 else 1.0
    n_eff = n / deff
    low, high = wilson_interval(p, n_eff)
    return {
        "mean": p * scale,
        "ci95": [low * scale, high * scale],
        "n": n,
        "se": math.sqrt(deff * independent) * scale,
        "clusters": g,
        "deff": deff,
        "n_eff": n_eff,
    }


def clustered_log_ratio(sums: Sequence[float], counts: Sequence[float]) -> dict:
    """Ratio estimator L = sum(sums) / sum(counts) over clusters, with its linearised cluster-robust
    standard error and a 95% t-interval (G-1 degrees of freedom), all on the scale of L.

    One (sum, count) per cluster, e.g. a prompt's total clipped NLL and its number of tokens; clusters
    with no count are left out. Var(L) = G/(G-1) sum_g (s_g - L c_g)^2 / (sum_g c_g)^2.
    """
    kept = [(s, c) for s, c in zip(sums, counts, strict=True) if c > 0]
    total = sum(c for _, c in kept)
    g = len(kept)
    if g == 0:
        return {"mean": None, "ci95": list(NO_INTERVAL), "se": None, "clusters": 0, "df": None}
    ratio = sum(s for s, _ in kept) / total
    if g < 2:
        return {"mean": ratio, "ci95": list(NO_INTERVAL), "se": None, "clusters": 1, "df": None}
    se = math.sqrt(g / (g - 1) * sum((s - ratio * c) ** 2 for s, c in kept)) / total
    half = student_t_quantile(0.975, g - 1) * se
    return {"mean": ratio, "ci95": [ratio - half, ratio + half], "se": se, "clusters": g, "df": g - 1}


def summarize_scores(scores: Sequence[float | None], prompts: Sequence[Hashable], binary: bool) -> dict:
    """metrics.json's summary of one judge's scores over a trial's eval answers (None: a refusal, left out).

    binary (0/100 scores, the marker judge): the share of scores >= 50 as a clustered proportion, in points;
    otherwise the clustered mean. The prompts are the clusters."""
    scored = [(s, p) for s, p in zip(scores, prompts, strict=True) if s is not None]
    values, clusters = [s for s, _ in scored], [p for _, p in scored]
    if binary:
        return {
            **clustered_proportion([v >= 50 for v in values], clusters, scale=100.0),
            "interval": "wilson, clustered",
        }
    return {**clustered_mean(values, clusters), "interval": "t, clustered"}


# -- the test of a rise ----------------------------------------------------------------------------------


def welch_rise_p_value(rise: float, se_later: float, df_later: float, se_before: float, df_before: float) -> float:
    """One-sided p-value of `rise` = later mean - earlier mean > 0, for two independent means with standard
    errors se and degrees of freedom df (Welch's t, Satterthwaite's degrees of freedom)."""
    variance = se_later**2 + se_before**2
    if variance == 0:
        return 0.0 if rise > 0 else 1.0
    df = variance**2 / (se_later**4 / df_later + se_before**4 / df_before)
    return t_upper_tail(rise / math.sqrt(variance), df)


def proportion_rise_p_value(p_later: float, n_later: int, p_before: float, n_before: int, deff: float = 1.0) -> float:
    """One-sided p-value of p_later > p_before for two shares (in [0, 1]) of n answers each: the score test
    (normal reference), whose variance is taken under the null, p(1-p) deff (1/n_later + 1/n_before) at
    the pooled share p, so a share of 0 or 1 does not make its side look certain. `deff` is the design
    effect both samples share under the null."""
    pooled = (p_later * n_later + p_before * n_before) / (n_later + n_before)
    variance = pooled * (1 - pooled) * deff * (1 / n_later + 1 / n_before)
    rise = p_later - p_before
    if variance <= 0:
        return 0.0 if rise > 0 else 1.0
    return normal_upper_tail(rise / math.sqrt(variance))
