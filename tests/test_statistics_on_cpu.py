"""Intervals and the amplification test against hand computations, and the default verdict's
false-positive rate and power measured on simulated trials through the real summary and verdict code."""

import math

import numpy as np
import pytest

from idempo.config import AmplificationConfig
from idempo.evaluation.amplification import amplification, rise_p_value, trial_summary
from idempo.evaluation.stats import (
    Z95,
    clustered_log_ratio,
    clustered_mean,
    clustered_proportion,
    mean_ci,
    normal_upper_tail,
    proportion_rise_p_value,
    regularized_incomplete_beta,
    student_t_cdf,
    student_t_quantile,
    summarize_scores,
    welch_rise_p_value,
    wilson_interval,
)

# -- the Student-t distribution ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, df, expected",
    [
        (0.975, 1, 12.7062047),
        (0.975, 2, 4.3026527),
        (0.975, 10, 2.2281389),
        (0.975, 11, 2.2009852),
        (0.995, 5, 4.0321430),
        (0.95, 30, 1.6972609),
        (0.025, 3, -3.1824463),
        (0.975, 10**9, 1.9599640),
    ],
)
def test_student_t_quantiles_match_the_tables(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-6)


def test_student_t_cdf_matches_its_closed_forms():
    for t in (-7.0, -1.3, 0.0, 0.4, 2.5, 30.0):
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert student_t_cdf(student_t_quantile(0.99, 7.5), 7.5) == pytest.approx(0.99, abs=1e-12)  # real df


def test_regularized_incomplete_beta_by_hand():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert regularized_incomplete_beta(x, 1, 1) == pytest.approx(x)
        assert regularized_incomplete_beta(x, 3, 1) == pytest.approx(x**3)
        assert regularized_incomplete_beta(x, 2.5, 4) == pytest.approx(1 - regularized_incomplete_beta(1 - x, 4, 2.5))


# -- across replicas -----------------------------------------------------------------------------------


def test_replica_interval_is_a_t_interval_with_n_minus_1_degrees_of_freedom():
    two = mean_ci([10.0, 20.0])  # sd = sqrt(50), se = 5, t(0.975, 1) = 12.7062
    assert two["mean"] == 15 and two["se"] == pytest.approx(5.0)
    assert two["ci95"] == pytest.approx([15 - 12.7062047 * 5, 15 + 12.7062047 * 5], abs=1e-5)  # [-48.5, 78.5]
    four = mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.1824463 * math.sqrt(5 / 3) / 2
    assert four["ci95"] == pytest.approx([2.5 - half, 2.5 + half], abs=1e-6)
    assert mean_ci([7.0])["ci95"] == [None, None]  # one replica: no interval, never a zero-width one
    assert mean_ci([])["mean"] is None and mean_ci([])["ci95"] == [None, None]


# -- within a trial, clustered by prompt -------------------------------------------------------------------


def test_cluster_robust_mean_by_hand():
    # prompts a: 1, 3; b: 5, 7. Mean 4; residual sums -4 and +4; V = G/(G-1) sum e_g^2 / n^2 = 2 * 32 / 16 = 4
    result = clustered_mean([1.0, 3.0, 5.0, 7.0], ["a", "a", "b", "b"])
    assert result["mean"] == 4 and result["se"] == pytest.approx(2.0) and result["clusters"] == 2
    assert result["df"] == 1 and result["ci95"] == pytest.approx([4 - 12.7062047 * 2, 4 + 12.7062047 * 2], abs=1e-5)
    # one answer per prompt: the ordinary t-interval, s / sqrt(n) with n-1 degrees of freedom
    single = clustered_mean([1.0, 2.0, 3.0, 4.0], ["a", "b", "c", "d"])
    assert single["se"] == pytest.approx(math.sqrt(5 / 3) / 2) and single["ci95"] == pytest.approx(
        mean_ci([1, 2, 3, 4])["ci95"]
    )
    # three prompts of unequal size: a: 10, 20, 30; b: 40; c: 0, 0 -> mean 100/6
    values, prompts = [10.0, 20.0, 30.0, 40.0, 0.0, 0.0], ["a", "a", "a", "b", "c", "c"]
    mean = 100 / 6
    sums = [60 - 3 * mean, 40 - mean, -2 * mean]
    se = math.sqrt(3 / 2 * sum(e * e for e in sums) / 36)
    result = clustered_mean(values, prompts)
    assert result["se"] == pytest.approx(se) and result["df"] == 2
    assert result["ci95"] == pytest.approx([mean - 4.3026527 * se, mean + 4.3026527 * se], abs=1e-5)


def test_clustered_proportion_is_a_wilson_interval_at_the_effective_sample_size():
    # a: 1 1 1, b: 0 0 0, c: 1 0 0 -> p = 4/9; residual sums 5/3, -4/3, -1/3
    hits = [1, 1, 1, 0, 0, 0, 1, 0, 0]
    prompts = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    p = 4 / 9
    clustered = 3 / 2 * (25 / 9 + 16 / 9 + 1 / 9) / 81
    deff = clustered / (p * (1 - p) / 9)
    result = clustered_proportion(hits, prompts, scale=100)
    assert result["deff"] == pytest.approx(deff) and result["n_eff"] == pytest.approx(9 / deff)
    n = 9 / deff
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    assert result["ci95"] == pytest.approx([100 * (centre - half), 100 * (centre + half)])
    assert result["se"] == pytest.approx(100 * math.sqrt(clustered)) and result["mean"] == pytest.approx(400 / 9)
    # answers that disagree within every prompt: the estimated deff is below 1 and is taken as 1
    even = clustered_proportion([1, 0, 1, 0, 1, 0], ["a", "a", "b", "b", "c", "c"])
    assert even["deff"] == 1 and even["ci95"] == pytest.approx(list(wilson_interval(0.5, 6)))
    # 0 and 100%: not empty
    none = clustered_proportion([0] * 36, [i // 3 for i in range(36)], scale=100)
    assert none["ci95"][0] == 0 and none["ci95"][1] == pytest.approx(100 * Z95**2 / (36 + Z95**2))
    assert clustered_proportion([1] * 36, [i // 3 for i in range(36)])["ci95"][0] < 1


def test_ratio_estimator_by_hand():
    # prompt sums of values 3, 8, 4 over 2, 4, 4 tokens: L = 15/10 = 1.5; residuals 0, 2, -2
    result = clustered_log_ratio([3.0, 8.0, 4.0], [2, 4, 4])
    se = math.sqrt(3 / 2 * 8) / 10
    assert result["mean"] == 1.5 and result["se"] == pytest.approx(se) and result["df"] == 2
    assert result["ci95"] == pytest.approx([1.5 - 4.3026527 * se, 1.5 + 4.3026527 * se], abs=1e-5)
    assert clustered_log_ratio([3.0], [2])["ci95"] == [None, None]


def test_score_summaries_skip_refusals_and_count_prompts_with_a_score():
    summary = summarize_scores([80.0, None, 60.0, None, None, 20.0], ["a", "a", "b", "c", "c", "b"], binary=False)
    assert summary["n"] == 3 and summary["clusters"] == 2 and summary["mean"] == pytest.approx(160 / 3)
    marker = summarize_scores([100.0, 0.0, 0.0, 100.0], ["a", "a", "b", "b"], binary=True)
    assert marker["mean"] == 50 and marker["n_eff"] == 4 and marker["interval"] == "wilson, clustered"


# -- the test of a rise ------------------------------------------------------------------------------------


def test_rise_p_values_by_hand():
    # Welch: rise 10, se 3 and 4 with 11 df each: t = 2, df = 25^2 / ((81 + 256) / 11) = 20.40
    df = 625 / (337 / 11)
    assert welch_rise_p_value(10, 3, 11, 4, 11) == pytest.approx(1 - student_t_cdf(2, df))
    # score test: 18/36 vs 9/36 -> pooled 0.375, variance 0.375 * 0.625 * 2/36 (x deff 1.5)
    z = 0.25 / math.sqrt(0.375 * 0.625 * 2 / 36 * 1.5)
    assert proportion_rise_p_value(0.5, 36, 0.25, 36, deff=1.5) == pytest.approx(normal_upper_tail(z))
    # a seed at 0%: the null variance at the pooled share is not 0
    assert 0 < proportion_rise_p_value(4 / 36, 36, 0.0, 36) < 0.05
    later = {"mean": 50.0, "n": 36, "deff": 1.2, "clusters": 12}
    seed = {"mean": 25.0, "n": 36, "deff": 1.5, "clusters": 12}
    assert rise_p_value(later, seed) == pytest.approx(normal_upper_tail(z))  # the larger deff of the two
    # metrics written before standard errors: the interval's half-width / 1.96, n - 1 degrees of freedom
    old = {"mean": 60.0, "ci95": [60 - 2 * Z95, 60 + 2 * Z95], "n": 12}
    older = {"mean": 50.0, "ci95": [50 - 2 * Z95, 50 + 2 * Z95], "n": 12}
    assert rise_p_value(old, older) == pytest.approx(welch_rise_p_value(10, 2, 11, 2, 11))


# -- the verdict in words ------------------------------------------------------------------------------------


def summary(mean, se=2.0, n=36):
    return {"mean": mean, "ci95": [mean - 4 * se, mean + 4 * se], "n": n, "se": se, "clusters": 12, "df": 11}


def test_the_verdict_names_its_rule_and_why_it_is_undecided():
    settings = AmplificationConfig()
    assert settings.criterion == "test" and settings.alpha == 0.05
    flat = [{"cycle": c, "trait": summary(40.0)} for c in range(3)]
    result = amplification(flat, settings)
    assert result["amplified"] is None
    assert (
        result["rule"]
        == "test: +15 points over M_seed and one-sided familywise alpha 0.05 (Bonferroni) over cycles >= 4"
    )
    assert result["undecided_reason"] == "the rule's counted cycles (>= 4) not reached: last cycle 2"
    refused = [{"cycle": 0, "trait": {"mean": None, "ci95": [None, None], "n": 0}}, *flat[1:]]
    assert amplification(refused, settings)["undecided_reason"] == (
        "no seed score (every trait answer of M_seed was a refusal)"
    )
    assert "not evaluated yet" in amplification([{"cycle": -1, "trait": summary(5.0)}], settings)["undecided_reason"]
    words = amplification(flat, AmplificationConfig(criterion="delta", sustained_cycles=2))["rule"]
    assert words == "delta: +15 points over M_seed at one of the cycles >= 4, 2 consecutive cycles"


def test_the_test_rule_asks_for_the_rise_and_its_significance_over_the_counted_cycles():
    seed = [{"cycle": 0, "trait": summary(40.0)}]
    # cycles 4..10 counted (m = 7): alpha per cycle 0.05 / 7
    tight = seed + [{"cycle": c, "trait": summary(40.0 if c != 6 else 56.0)} for c in range(1, 11)]
    result = amplification(tight, AmplificationConfig())
    assert result["amplified"] is True and result["first_amplified_cycle"] == 6
    assert result["alpha_per_cycle"] == pytest.approx(0.05 / 7)
    assert result["min_p_value"] == pytest.approx(welch_rise_p_value(16, 2, 11, 2, 11))
    # the same rise with wide standard errors is not significant; the authors' rule flags it anyway
    loose = seed[:1] + [{"cycle": c, "trait": summary(40.0 if c != 6 else 56.0, se=8)} for c in range(1, 11)]
    loose[0] = {"cycle": 0, "trait": summary(40.0, se=8)}
    assert amplification(loose, AmplificationConfig())["amplified"] is False
    assert amplification(loose, AmplificationConfig(criterion="delta"))["amplified"] is True
    # significant but under the threshold
    small = seed + [{"cycle": c, "trait": summary(40.0 if c != 6 else 54.0, se=0.5)} for c in range(1, 11)]
    small[0] = {"cycle": 0, "trait": summary(40.0, se=0.5)}
    assert amplification(small, AmplificationConfig())["amplified"] is False
    # a cycle with neither a standard error nor an interval cannot be tested
    blind = seed + [{"cycle": 4, "trait": {"mean": 70.0, "ci95": [None, None], "n": 1}}]
    result = amplification(blind, AmplificationConfig())
    assert result["amplified"] is None and result["undecided_reason"].startswith(
        "cycle 4's trait has no standard error"
    )


def test_the_test_rule_corrects_for_the_cycles_the_trial_plans_so_a_verdict_stands():
    """At cycle 5 of a 10-cycle trial two counted cycles are done, but seven will be looked at: the level
    is 0.05 / 7 from the start, so a True cannot turn False as the trial goes on."""
    p_value = welch_rise_p_value(20, 6, 11, 6, 11)  # a 20-point rise, standard errors of 6 points
    assert 0.05 / 7 < p_value <= 0.05 / 2  # significant at 0.05 / 2, not at 0.05 / 7
    partial = [{"cycle": 0, "trait": summary(40.0, se=6)}] + [
        {"cycle": c, "trait": summary(60.0 if c == 5 else 40.0, se=6)} for c in range(1, 6)
    ]
    assert amplification(partial, AmplificationConfig())["amplified"] is True  # plan unknown: m = 2
    planned = amplification(partial, AmplificationConfig(), planned_cycles=10)
    assert planned["amplified"] is False and planned["alpha_per_cycle"] == pytest.approx(0.05 / 7)
    assert trial_summary(partial, AmplificationConfig(), None, 10)["amplified"] is False


# -- simulated trials: false positives of a constant trait, and power ---------------------------------------

PROMPTS, SAMPLES, CYCLES = 12, 3, 10  # the default evaluation size (the authors'), 10 cycles after the seed
PROMPT_OF_ANSWER = [f"prompt {g}" for g in range(PROMPTS) for _ in range(SAMPLES)]
HETEROGENEITY = 4.0  # prompt trait rates ~ Beta(p k, (1 - p) k), k = 4: intra-prompt correlation 1/5
# judge-like scores: 100 Beta(8, 2) on an answer with the trait (mean 80), 100 Beta(1.5, 12) without (mean 11.1)
LIKERT_SPAN = 80 - 100 * 1.5 / 13.5


def simulated_trials(seed, trials, base, redrawn, binary, rise=0.0):
    """metrics-like histories of trials whose trait rate is `base` at the seed and at every cycle (plus
    `rise` from cycle 1 on), with prompt rates fixed for a trial or redrawn at every cycle, summarised
    by the real summary function."""
    rng = np.random.default_rng(seed)
    shape = (trials, CYCLES + 1, PROMPTS)
    drawn = rng.beta(base * HETEROGENEITY, (1 - base) * HETEROGENEITY, (trials, CYCLES + 1 if redrawn else 1, PROMPTS))
    rates = np.broadcast_to(drawn, shape).copy()
    rates[:, 1:] += rise * (1 - rates[:, 1:]) / (1 - base)  # towards 1, inside [0, 1]; the mean rises by `rise`
    trait = rng.random((*shape, SAMPLES)) < rates[..., None]
    if binary:
        scores = 100.0 * trait
    else:
        scores = 100 * np.where(trait, rng.beta(8, 2, trait.shape), rng.beta(1.5, 12, trait.shape))
    return [
        [
            {"cycle": cycle, "trait": summarize_scores(scores[t, cycle].ravel().tolist(), PROMPT_OF_ANSWER, binary)}
            for cycle in range(CYCLES + 1)
        ]
        for t in range(trials)
    ]


def flagged_share(histories, settings):
    return sum(bool(amplification(h, settings)["amplified"]) for h in histories) / len(histories)


@pytest.mark.parametrize("binary", [True, False], ids=["marker", "judge"])
@pytest.mark.parametrize("redrawn", [False, True], ids=["prompts-fixed", "prompts-redrawn"])
def test_a_constant_trait_is_flagged_in_at_most_5_percent_of_trials_by_default(binary, redrawn):
    rates = {}
    for base in (0.1, 0.3, 0.5, 0.7):
        histories = simulated_trials([binary, redrawn, int(base * 10)], 2000, base, redrawn, binary)
        rates[base] = (
            flagged_share(histories, AmplificationConfig()),
            flagged_share(histories, AmplificationConfig(criterion="delta")),
        )
    print(rates)  # shown with -s; docs/metrics.md records them
    for base, (default, _) in rates.items():
        assert default <= 0.05, (base, rates)
    # the authors' rule flags a constant trait far more often (shown where noise can reach 15 points)
    assert max(authors for _, authors in rates.values()) > 0.10, rates


@pytest.mark.parametrize("binary", [True, False], ids=["marker", "judge"])
def test_a_rise_of_30_points_is_flagged_most_of_the_time(binary):
    rise = 0.3 if binary else 30 / LIKERT_SPAN  # 30 points of the score
    for redrawn in (False, True):
        for base in (0.1, 0.3, 0.5):
            histories = simulated_trials([7, binary, redrawn, int(base * 10)], 300, base, redrawn, binary, rise)
            power = flagged_share(histories, AmplificationConfig())
            print(binary, redrawn, base, power)
            assert power > 0.5, (redrawn, base, power)
