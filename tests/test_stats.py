"""The report's statistics: the crossed seeds x images interval against the textbook two-way formula, its
coverage on simulated runs, a pigeonhole bootstrap, ties, verdicts, Holm's correction and power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from alexnet.report import stats


def paired_design(seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows: the paper arm's run of each seed, then the other arm's; columns: paper level, seed blocks."""
    x = np.zeros((2 * seeds, seeds + 1))
    x[:seeds, 0] = 1
    x[np.arange(2 * seeds), 1 + np.tile(np.arange(seeds), 2)] = 1
    return x, np.eye(seeds + 1)[0]


def simulate(rng, seeds: int, images: int, effect: float, arm_seed_sd=0.15, arm_image_sd=0.5) -> np.ndarray:
    """0/1 errors of two arms (paper first) that share their seeds' noise and their images' difficulty:
    a logistic model with seed, image, seed x arm and image x arm effects."""
    difficulty = rng.normal(0, 1.5, images)
    image_arm = rng.normal(0, arm_image_sd, images)
    seed_shift = rng.normal(0, 0.3, seeds)
    arm_seed = rng.normal(0, arm_seed_sd, seeds)
    rows = []
    for arm in (0, 1):
        for s in range(seeds):
            logit = -0.8 + difficulty + seed_shift[s] + arm * (effect + image_arm + arm_seed[s])
            rows.append(rng.random(images) < 1 / (1 + np.exp(-logit)))
    return np.array(rows, dtype=float)


def test_paired_case_equals_the_two_way_anova_formula():
    """For two arms paired by seed, the estimate is the textbook crossed random-effects variance of the
    mean of z = a - b: (MS_seeds + MS_images - MS_residual) / (S * I)."""
    rng = np.random.default_rng(0)
    y = simulate(rng, seeds=4, images=3000, effect=0.3)
    x, contrast = paired_design(4)
    est = stats.crossed(y, x, contrast, seeds=4)
    z = y[:4] - y[4:]  # (seeds, images)
    s, i = z.shape
    grand = z.mean()
    ms_seeds = i * ((z.mean(1) - grand) ** 2).sum() / (s - 1)
    ms_images = s * ((z.mean(0) - grand) ** 2).sum() / (i - 1)
    resid = z - z.mean(1, keepdims=True) - z.mean(0, keepdims=True) + grand
    ms_resid = (resid**2).sum() / ((s - 1) * (i - 1))
    assert est.mean == pytest.approx(grand)
    assert est.se**2 == pytest.approx((ms_seeds + ms_images - ms_resid) / (s * i), rel=1e-9)
    assert est.run_part + est.image_part == pytest.approx(est.se**2)


@pytest.mark.parametrize(("arm_seed_sd", "arm_image_sd"), [(0.15, 0.5), (0.02, 1.0)])
def test_intervals_cover_the_true_effect_on_simulated_runs(arm_seed_sd: float, arm_image_sd: float):
    """300 simulated studies of 4 seeds x 2,000 images: the 95% interval covers the true difference of
    expected errors about 95% of the time and its standard error matches the spread of the estimates, with
    much or little seed noise in the delta (common random numbers leave little)."""
    rng = np.random.default_rng(1)
    x, contrast = paired_design(4)
    truth = _true_delta(0.25, arm_seed_sd, arm_image_sd)
    covered = 0
    means, ses = [], []
    for _ in range(300):
        est = stats.crossed(simulate(rng, 4, 2000, 0.25, arm_seed_sd, arm_image_sd), x, contrast, seeds=4)
        covered += est.low <= truth <= est.high
        means.append(est.mean)
        ses.append(est.se)
    assert 0.91 <= covered / 300 <= 0.99
    assert np.sqrt(np.mean(np.square(ses))) == pytest.approx(np.std(means), rel=0.15)


def _true_delta(effect: float, arm_seed_sd: float, arm_image_sd: float) -> float:
    """E[error of the paper arm] - E[error of the other arm], by Monte Carlo over the model's effects."""
    rng = np.random.default_rng(99)
    n = 2_000_000
    d, ia = rng.normal(0, 1.5, n), rng.normal(0, arm_image_sd, n)
    s, sa = rng.normal(0, 0.3, n), rng.normal(0, arm_seed_sd, n)
    p0 = 1 / (1 + np.exp(-(-0.8 + d + s)))
    p1 = 1 / (1 + np.exp(-(-0.8 + d + s + effect + ia + sa)))
    return float((p0 - p1).mean())


def test_a_pigeonhole_bootstrap_overstates_what_the_estimator_measures():
    """Owen's (2007) two-way bootstrap, resampling seeds and images independently, counts the seed x image
    noise more than once, so its standard error is larger (Owen: conservative)."""
    rng = np.random.default_rng(2)
    y = simulate(rng, 6, 2000, 0.2)
    x, contrast = paired_design(6)
    est = stats.crossed(y, x, contrast, seeds=6)
    z = y[:6] - y[6:]
    boot = [z[np.ix_(rng.integers(0, 6, 6), rng.integers(0, 2000, 2000))].mean() for _ in range(2000)]
    assert est.se < np.std(boot) < 2 * est.se


def test_ties_between_seeds_do_not_give_a_zero_width_interval():
    """Two seeds whose error rates differ by exactly the same amount (a 2,000-image test set moves in steps
    of 0.05 points): the images still disagree, so the interval has width; and n = 2 decides nothing."""
    y = np.zeros((4, 2000))
    y[0, :100] = 1  # seed 1, paper arm: 100 errors
    y[1, 50:150] = 1  # seed 2, paper arm: 100 errors, on other images
    y[2, :102] = 1  # seed 1, other arm: 102 errors
    y[3, 48:150] = 1  # seed 2, other arm: 102 errors
    x, contrast = paired_design(2)
    est = stats.crossed(100 * y, x, contrast, seeds=2)
    assert est.mean == pytest.approx(-0.10)
    assert est.high - est.low > 0.1
    verdict = stats.verdict(est.mean, vars(stats.test(est, -1.5, 0.5)), -1.5, -1, noise_df=1, min_seeds=3)
    assert verdict == "inconclusive"


def interval(mean: float, se: float, n: int = 5, df: float = 4.0) -> stats.Estimate:
    return stats.Estimate(mean, se, df, n, se**2, 0.0)


@pytest.mark.parametrize(
    ("mean", "se", "reported", "direction", "expected"),
    [
        (-1.5, 0.2, -1.4, -1, "reproduced"),  # excludes 0 on the paper's side, holds the paper's number
        (-3.0, 0.2, -1.4, -1, "reproduced"),  # larger than reported still supports the claim
        (-0.6, 0.1, -1.4, -1, "smaller than reported"),  # excludes 0 and the paper's number
        (0.05, 0.1, -1.4, -1, "no effect"),  # within +-0.5
        (0.3, 0.3, -1.4, -1, "smaller than reported"),  # contains 0, excludes -1.4, not within the margin
        (1.5, 0.2, -1.4, -1, "opposite"),
        (-0.8, 0.8, -1.4, -1, "inconclusive"),
        (-1.0, 0.2, None, -1, "reproduced"),  # no number in the paper: the direction decides
        (0.8, 0.2, None, 0, "detected"),  # an interaction: two-sided
    ],
)
def test_verdict_rules(mean, se, reported, direction, expected):
    est = interval(mean, se)
    p = vars(stats.test(est, reported, 0.5))
    assert stats.verdict(mean, p, reported, direction, noise_df=4, min_seeds=3) == expected


def test_verdicts_match_the_interval():
    """p < 0.05 exactly when the 95% interval excludes the value tested, for each family."""
    est = interval(-0.9, 0.3)
    t = stats.test(est, -1.4, 0.5)
    assert (t.p_zero < 0.05) == (est.high < 0)
    assert (t.p_paper < 0.05) == (not est.low <= -1.4 <= est.high)
    assert (t.p_equiv < 0.05) == (est.low >= -0.5 and est.high <= 0.5)


def test_holm_correction_across_rows():
    """Holm on the p-values of every row: 14 rows, the smallest p times 14, the next times 13, ..."""
    tests = [stats.Test(p_zero=p) for p in [0.001, 0.004, 0.03] + [0.5] * 11]
    stats.adjust(tests)
    adjusted = [t.adjusted["p_zero"] for t in tests]
    assert adjusted[:3] == pytest.approx([0.014, 0.052, 0.36])
    raw = stats.verdict(-1, {"p_zero": 0.03, "p_paper": math.nan, "p_equiv": 1.0}, None, -1, 4, 3)
    held = stats.verdict(-1, {"p_zero": 0.36, "p_paper": math.nan, "p_equiv": 1.0}, None, -1, 4, 3)
    assert (raw, held) == ("reproduced", "inconclusive")


def test_minimum_detectable_effect_and_seeds_needed():
    """MDE = (t_0.975 + t_0.80) * SE. Seeds: the runs' variance shrinks as 1 / seeds, the images' does not;
    an effect below what the test set alone allows is never reachable."""
    est = stats.Estimate(-0.5, 0.5, 4.0, 5, run_part=0.2, image_part=0.05)
    assert stats.mde(est) == pytest.approx((scipy_stats.t.ppf(0.975, 4) + scipy_stats.t.ppf(0.8, 4)) * 0.5)
    needed = stats.seeds_needed(est, -1.4)
    se = math.sqrt(0.2 * 5 / needed + 0.05)
    df = 4.0 * (needed - 1) / 4
    assert (scipy_stats.t.ppf(0.975, df) + scipy_stats.t.ppf(0.8, df)) * se <= 1.4
    se_fewer = math.sqrt(0.2 * 5 / (needed - 1) + 0.05)
    df_fewer = 4.0 * (needed - 2) / 4
    assert (scipy_stats.t.ppf(0.975, df_fewer) + scipy_stats.t.ppf(0.8, df_fewer)) * se_fewer > 1.4
    assert stats.seeds_needed(est, -0.3) is None  # 2.8 * sqrt(0.05) = 0.63 > 0.3: the test set limits it
    assert stats.seeds_needed(est, None) is None


def test_pairing_gain_is_the_variance_ratio():
    a = {1: 30.0, 2: 32.0, 3: 31.0, 4: 33.5}
    b = {1: 31.0, 2: 33.2, 3: 31.9, 4: 34.4}
    r, gain = stats.pairing_gain(a, b)
    assert r > 0.95
    diff = np.array([a[s] - b[s] for s in a])
    assert gain == pytest.approx(
        (np.var(list(a.values()), ddof=1) + np.var(list(b.values()), ddof=1)) / diff.var(ddof=1)
    )
