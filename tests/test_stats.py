"""The report's statistics: the crossed seeds x images interval against the textbook two-way formula, its
coverage on simulated runs, a pigeonhole bootstrap, ties, verdicts, Holm's correction and power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

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
    much or little seed noise in the delta (common random numbers leave little). With little, the interval
    errs on the safe side: its t has the seeds' few degrees of freedom (docs/statistics.md says why)."""
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
    assert covered / 300 >= 0.93  # with little seed noise, above 0.95: the t of seeds - 1 is conservative
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


def test_holm_runs_once_over_every_hypothesis_of_the_family():
    """One family, one step-down: the p-values of all three tests of every row are ranked together (here 3
    rows x 3 tests = 9 hypotheses, less the one a row without a paper number does not test), so no test
    gets a family of its own and a budget of its own."""
    tests = [stats.Test(p_zero=0.001, p_paper=0.2, p_equiv=0.9), stats.Test(p_zero=0.004, p_paper=0.5,
             p_equiv=0.8), stats.Test(p_zero=0.01, p_equiv=0.01)]  # fmt: skip
    stats.adjust(tests)
    assert tests[0].adjusted["p_zero"] == pytest.approx(0.001 * 8)
    assert tests[1].adjusted["p_zero"] == pytest.approx(0.004 * 7)
    assert tests[2].adjusted["p_zero"] == pytest.approx(0.01 * 6)  # tied with p_equiv: 6 and 5 left
    assert tests[2].adjusted["p_equiv"] == pytest.approx(0.01 * 6)  # step-down keeps them monotone
    assert "p_paper" not in tests[2].adjusted


def test_a_wrong_verdict_is_one_that_rejects_a_true_hypothesis():
    """What the familywise rate counts: each verdict against the truth that would make it false."""
    assert stats.wrong("reproduced", 0.0, -1.4, -1, 0.5) and not stats.wrong(
        "reproduced", -0.1, -1.4, -1, 0.5
    )
    assert stats.wrong("opposite", -0.2, None, -1, 0.5) and not stats.wrong("opposite", 0.3, None, -1, 0.5)
    assert stats.wrong("smaller than reported", -1.4, -1.4, -1, 0.5)
    assert not stats.wrong("smaller than reported", -1.0, -1.4, -1, 0.5)
    assert stats.wrong("no effect", 0.5, None, -1, 0.5) and not stats.wrong("no effect", 0.49, None, -1, 0.5)
    assert stats.wrong("detected", 0.0, None, 0, 0.5) and not stats.wrong("inconclusive", 9.0, None, -1, 0.5)


def test_power_is_the_noncentral_t_as_statsmodels_computes_it():
    """Without a test-set part, a row of n seeds is a one-sample t test on n deltas: its MDE and the seeds
    it needs are what statsmodels' TTestPower solves for."""
    sigma, n = 1.2, 4
    est = stats.Estimate(-0.5, sigma / math.sqrt(n), n - 1.0, n, run_part=sigma**2 / n)
    power = TTestPower().power(effect_size=stats.mde(est) / sigma, nobs=n, alpha=0.05)
    assert power == pytest.approx(0.80, abs=1e-6)
    needed = stats.seeds_needed(est, -1.4)
    solved = TTestPower().solve_power(effect_size=1.4 / sigma, power=0.80, alpha=0.05)
    assert needed == math.ceil(solved)


def test_seeds_for_80_percent_after_holm_give_80_percent_power_after_holm():
    """At the family's Bonferroni level the seeds found reject the row's null at least 80% of the time
    after Holm's step-down over the whole family, here 9 tests whose other 8 nulls are true."""
    sigma, n, tests = 1.0, 4, 9
    est = stats.Estimate(-1.4, sigma / math.sqrt(n), n - 1.0, n, run_part=sigma**2 / n)
    needed = stats.seeds_needed(est, -1.4, alpha=0.05 / tests)
    solved = TTestPower().solve_power(effect_size=1.4 / sigma, power=0.80, alpha=0.05 / tests)
    assert needed == math.ceil(solved) and needed > stats.seeds_needed(est, -1.4)
    rng = np.random.default_rng(7)
    deltas = rng.normal(-1.4, sigma, size=(4000, needed))
    t = deltas.mean(axis=1) / (deltas.std(axis=1, ddof=1) / math.sqrt(needed))
    p_row = 2 * scipy_stats.t.sf(np.abs(t), needed - 1)
    family = np.column_stack([p_row, rng.uniform(size=(len(p_row), tests - 1))])
    # Holm's adjusted p-values, vectorised over the 4000 families (statsmodels' takes one family a call) ...
    order = np.argsort(family, axis=1)
    steps = np.maximum.accumulate(np.take_along_axis(family, order, 1) * np.arange(tests, 0, -1), axis=1)
    adjusted = np.empty_like(family)
    np.put_along_axis(adjusted, order, np.minimum(steps, 1.0), 1)
    # ... which are statsmodels' own on the first few.
    for i in range(5):
        assert adjusted[i] == pytest.approx(multipletests(family[i], method="holm")[1])
    assert np.mean(adjusted[:, 0] < 0.05) >= 0.80 - 3 * math.sqrt(0.8 * 0.2 / len(p_row))


def test_seeds_needed_is_never_below_the_minimum_and_the_test_set_can_make_it_unreachable():
    est = stats.Estimate(-3.0, 0.2, 5.0, 6, run_part=0.03, image_part=0.01)
    assert stats.seeds_needed(est, -3.0, least=3) == 3  # 2 would do, but no verdict comes from 2 seeds
    est = stats.Estimate(-0.5, 0.5, 4.0, 5, run_part=0.2, image_part=0.05)
    assert stats.seeds_needed(est, -0.3) is None  # 2.8 * sqrt(0.05) = 0.63 > 0.3: the test set limits it
    assert stats.seeds_needed(est, None) is None


def test_identical_arms_give_no_interval_and_no_verdict():
    """Two arms with the same outcomes on every image of every seed have a standard error of rounding
    (about 1e-17), and three equal per-seed deltas without images one of exactly 0: neither is noise."""
    rng = np.random.default_rng(3)
    same = (rng.random((3, 2000)) < 0.3).astype(float) * 100
    est = stats.per_seed(same - same[::-1][::-1])
    assert est.degenerate and not est.ok
    assert math.isnan(stats.test(est, -1.4, 0.5).p_zero)
    assert (
        stats.verdict(est.mean, vars(stats.test(est, -1.4, 0.5)), -1.4, -1, est.noise_df, 3) == "inconclusive"
    )
    flat = stats.per_seed(np.array([[-1.0], [-1.0], [-1.0]]))
    assert flat.degenerate and not flat.ok and math.isnan(stats.mde(flat))


def test_an_effect_that_varies_by_seed_gets_its_own_wider_interval():
    """per_seed: each effect's runs' variance comes from its own seeds, so one that varies from seed to seed
    is wide and one that does not stays narrow (a pooled residual gives both the same width)."""
    rng = np.random.default_rng(4)
    steady = -2.0 + rng.normal(0, 0.1, (4, 1))
    varying = -2.0 + rng.normal(0, 2.0, (4, 1))
    a, b = stats.per_seed(steady), stats.per_seed(varying)
    assert (a.df, b.df) == (3.0, 3.0)
    assert b.half > 5 * a.half


def test_pairing_gain_is_the_variance_ratio():
    a = {1: 30.0, 2: 32.0, 3: 31.0, 4: 33.5}
    b = {1: 31.0, 2: 33.2, 3: 31.9, 4: 34.4}
    r, gain = stats.pairing_gain(a, b)
    assert r > 0.95
    diff = np.array([a[s] - b[s] for s in a])
    assert gain == pytest.approx(
        (np.var(list(a.values()), ddof=1) + np.var(list(b.values()), ddof=1)) / diff.var(ddof=1)
    )
