"""The statistics of the report: intervals that hold both sources of noise, verdicts, their correction for
many rows, and power.

**The two sources.** A measured effect varies with the training seed (initial weights, data order,
augmentation, dropout) and with the finite test set (another 10,000 images would give other error rates).
Every arm is tested on the same images, so the data of an effect is a matrix: runs (seeds, arms, design
points) x test images, each cell 1 where the image was misclassified. Seeds and images are *crossed*
random factors, not nested: resampling the seeds of a hierarchical bootstrap would treat the images as
fixed, or as drawn anew for each seed.

**The estimator.** ``crossed`` fits the run-level design (the arms, the seeds as blocks, a factorial's
effects) by least squares, image by image, and splits the variance of a contrast of its coefficients with
the method of moments of the two-way random-effects model (Searle, Casella & McCulloch, "Variance
Components", 1992, ch. 4):

    Var = q * s2_run  +  Var_i(theta_i) / I  -  q * s2_e / I

where ``q = c' (X'X)^-1 c``, ``s2_run`` is the residual variance of the runs' error rates (seed noise plus
what the images average away), ``theta_i`` the contrast on image i alone, and ``s2_e`` the run x image
residual that both other terms contain (the image part, ``Var_i / I - q s2_e / I``, is floored at 0; seeds
that tie exactly keep ``q s2_e / I``). The
interval is a t interval with the runs' residual degrees of freedom (seeds - 1 for a delta), not
Satterthwaite's: those are estimated from the same seed part they weigh, so when a few seeds happen to
agree the standard error shrinks and the degrees of freedom jump together, which put a null row's p-values
below Holm's thresholds about five times too often (benchmarks/statistics_coverage.py). With the image part
known the statistic has lighter tails than that t, so the interval is valid, at a cost of about a tenth of
its width when the seeds' part is small.

Why not a bootstrap: with 3 to 8 seeds a bootstrap over seeds has too few distinct resamples and
its percentile intervals undercover (the t quantile with few degrees of freedom is exactly what they lack);
the moment estimator is exact for the balanced designs here and costs one least-squares fit. A test checks
it against a two-way (pigeonhole) bootstrap of simulated data (Owen, Ann. Appl. Stat. 2007).

Because the image term is there, ties between seeds (two equal error rates, which a 2,000-image test set
makes likely: rates move in steps of 0.05 points) still give an interval; with no noise at all (identical
arms) there is none (``Estimate.degenerate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05
POWER = 0.80
# A standard error this small against the data's own scale is rounding, not noise: two identical arms give
# about 1e-17 points. No interval (and no verdict) comes from it.
RELATIVE_TOLERANCE = 1e-9


@dataclass
class Estimate:
    """An effect with its standard error and the parts of its variance (all in the effect's units)."""

    mean: float
    se: float
    df: float
    n: int  # seeds (replicates) that entered
    run_part: float = math.nan  # variance from the runs' noise: shrinks as 1 / seeds
    image_part: float = 0.0  # variance from the test images: does not shrink with seeds
    method: str = ""
    # The runs' residual degrees of freedom (what measures their noise) and what each seed adds to them:
    # n - 1 and 1 for a pair of arms blocked by seed, 15 a seed for a 16-run design.
    run_df: float = math.nan
    df_per_seed: float = 1.0
    scale: float = 1.0  # the data's own size (its largest value, in the effect's units): for ``ok``

    @property
    def noise_df(self) -> float:
        return self.n - 1 if math.isnan(self.run_df) else self.run_df

    @property
    def half(self) -> float:
        return stats.t.ppf(1 - ALPHA / 2, self.df) * self.se if self.df > 0 else math.nan

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def degenerate(self) -> bool:
        """No noise at all: both sides gave the same results in every seed (and on every image)."""
        return math.isfinite(self.se) and self.se <= RELATIVE_TOLERANCE * max(self.scale, 1.0)

    @property
    def ok(self) -> bool:
        return self.n > 0 and math.isfinite(self.se) and not self.degenerate and self.df > 0


def crossed(y: np.ndarray, x: np.ndarray, contrast: np.ndarray, seeds: int) -> Estimate:
    """``y``: (runs, images) errors (0/1, or in points); ``x``: the run-level design (runs, p), full rank;
    ``contrast``: the effect as a combination of ``x``'s coefficients. One image (a run-level value only)
    gives the runs' part alone."""
    runs, images = y.shape
    scale = float(np.abs(y).max()) if y.size else 1.0
    xtx_inv = np.linalg.inv(x.T @ x)
    coefficients = xtx_inv @ x.T @ y  # (p, images): the fit on each image alone
    theta = contrast @ coefficients  # the effect on each image
    mean = float(theta.mean())
    q = float(contrast @ xtx_inv @ contrast)
    df_res = runs - x.shape[1]
    df_seed = runs / seeds - 1 if seeds else 1.0  # each seed adds its runs and one block
    if df_res <= 0:
        return Estimate(mean, math.nan, 0.0, seeds, method="no residual degrees of freedom: add seeds",
                        run_df=float(df_res), df_per_seed=df_seed, scale=scale)  # fmt: skip
    run_means = y.mean(axis=1)
    residual = run_means - x @ (xtx_inv @ x.T @ run_means)
    a = q * float(residual @ residual) / df_res
    if images == 1:
        return Estimate(mean, math.sqrt(a), float(df_res), seeds, a, 0.0, "runs only", df_res, df_seed, scale)
    b = float(theta.var(ddof=1)) / images
    cell = y - x @ coefficients
    s2_cells = float((cell * cell).sum()) / (df_res * images)  # estimates s2_run_noise + s2_e
    s2_e = max(0.0, (s2_cells - float(residual @ residual) / df_res) * images / (images - 1))
    c = q * s2_e / images
    image_part = max(b - c, 0.0)
    # Seeds that tie exactly (a = 0) with no image part left would give a zero-width interval: their runs'
    # part is then at least what the test images' noise alone puts into each run's error rate (c).
    run_part = a if math.sqrt(a + image_part) > RELATIVE_TOLERANCE * max(scale, 1.0) else c
    return Estimate(
        mean, math.sqrt(run_part + image_part), float(df_res), seeds, run_part, image_part, "seeds x images",
        df_res, df_seed, scale,
    )  # fmt: skip


def per_seed(theta: np.ndarray) -> Estimate:
    """An effect measured in each seed on its own: ``theta`` (seeds, images), the effect on each image
    within each seed (or (seeds, 1) without images). Its runs' variance is the spread of the seeds' own
    effects, with seeds - 1 degrees of freedom, however many runs each seed's effect averages: an effect
    that varies from seed to seed widens its own interval and no other's."""
    seeds = theta.shape[0]
    est = crossed(theta, np.ones((seeds, 1)), np.ones(1), seeds=seeds)
    est.df_per_seed = 1.0  # each seed is one more value of the effect
    return est


def log_ratio_estimate(ratios: list[float]) -> Estimate:
    """Per-seed ratios (Figure 1's epochs): a t interval of the mean log ratio; report it exponentiated."""
    logs = np.log(np.asarray(ratios, dtype=float))
    n = len(logs)
    if n < 2:
        return Estimate(float(logs.mean()) if n else math.nan, math.nan, 0.0, n, method="seeds")
    var = float(logs.var(ddof=1)) / n
    scale = float(np.abs(logs).max())
    return Estimate(float(logs.mean()), math.sqrt(var), float(n - 1), n, var, 0.0, "seeds (log ratio)",
                    scale=scale)  # fmt: skip


@dataclass
class Test:
    """The p-values behind a verdict: no effect (0), the paper's number, and equivalence within the margin
    (two one-sided tests, each at ALPHA / 2, so that p_equiv < ALPHA exactly when the 95% interval lies
    inside the margin)."""

    p_zero: float = math.nan
    p_paper: float = math.nan
    p_equiv: float = math.nan
    adjusted: dict[str, float] = field(default_factory=dict)


def test(est: Estimate, reported: float | None, margin: float) -> Test:
    if not est.ok:
        return Test()
    t = stats.t

    def two_sided(null: float) -> float:
        return float(2 * t.sf(abs(est.mean - null) / est.se, est.df))

    below = t.sf((est.mean + margin) / est.se, est.df)  # H0: effect <= -margin
    above = t.cdf((est.mean - margin) / est.se, est.df)  # H0: effect >= +margin
    return Test(
        p_zero=two_sided(0.0),
        p_paper=two_sided(reported) if reported is not None else math.nan,
        p_equiv=float(min(1.0, 2 * max(below, above))),
    )


VERDICTS = {
    "reproduced": "the interval excludes no effect, on the paper's side, and does not lie below the paper's "
    "number",
    "smaller than reported": "the interval excludes the paper's number on the side of no effect",
    "no effect": "the interval lies within the margin around no effect",
    "opposite": "the interval excludes no effect, on the other side",
    "detected": "(an interaction, which the paper does not claim) the interval excludes no effect",
    "inconclusive": "none of these, or fewer seeds than the minimum",
}


def verdict(
    mean: float, p: dict[str, float], reported: float | None, direction: int, noise_df: float, min_seeds: int
) -> str:
    """The rules of ``VERDICTS``, from p-values (raw or adjusted) at ALPHA. ``direction``: the sign of the
    paper's effect; 0 for a two-sided question (a factorial's interactions). ``noise_df``: the runs'
    residual degrees of freedom; a verdict needs as many as ``min_seeds`` seeds give a pair of arms
    (``min_seeds - 1``), however the runs were laid out."""
    if noise_df < min_seeds - 1 or not math.isfinite(p.get("p_zero", math.nan)):
        return "inconclusive"
    side = math.copysign(1, mean) if mean else 0
    if p["p_zero"] < ALPHA:
        if direction and side != direction:
            return "opposite"
        smaller = reported is not None and abs(mean) < abs(reported) and p["p_paper"] < ALPHA
        return "smaller than reported" if smaller else ("reproduced" if direction else "detected")
    if p["p_equiv"] < ALPHA:
        return "no effect"
    if reported is not None and p["p_paper"] < ALPHA and (mean * direction < abs(reported)):
        return "smaller than reported"
    return "inconclusive"


HYPOTHESES = ("p_zero", "p_paper", "p_equiv")


def adjust(tests: list[Test], method: str = "holm") -> None:
    """Correct one family of rows, in place: every p-value of every row (no effect, the paper's number,
    equivalence) in one Holm step-down (statsmodels). Each verdict rests on rejecting one of these
    hypotheses, and a wrong verdict on rejecting a true one, so the chance of any wrong corrected verdict
    in the family stays at ALPHA, whatever the rows' dependence and whichever test gave it."""
    where = [(t, h) for t in tests for h in HYPOTHESES if math.isfinite(getattr(t, h))]
    if not where:
        return
    corrected = multipletests([getattr(t, h) for t, h in where], alpha=ALPHA, method=method)[1]
    for (t, h), value in zip(where, corrected, strict=True):
        t.adjusted[h] = float(value)


def wrong(verdict_: str, truth: float, reported: float | None, direction: int, margin: float) -> bool:
    """Whether a verdict is false for the true effect ``truth``: what the familywise guarantee bounds (and
    benchmarks/statistics_coverage.py counts)."""
    on_side = truth * direction if direction else abs(truth)
    if verdict_ == "reproduced":
        return on_side <= 0
    if verdict_ == "detected":
        return truth == 0
    if verdict_ == "opposite":
        return on_side >= 0
    if verdict_ == "no effect":
        return abs(truth) >= margin
    if verdict_ == "smaller than reported":
        return reported is None or on_side >= abs(reported)
    return False


def power(effect: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """The chance that a two-sided t test at ``alpha`` calls ``effect`` non-zero, exactly: the noncentral
    t."""
    if not (se > 0 and df > 0):
        return math.nan
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = abs(effect) / se
    upper = float(stats.nct.sf(critical, df, shift))
    lower = float(stats.nct.cdf(-critical, df, shift))  # the wrong side: scipy gives nan where it is ~0
    if not math.isfinite(upper):
        upper = 1.0 - float(stats.nct.cdf(critical, df, shift))
    return upper + (lower if math.isfinite(lower) else 0.0)


def mde(est: Estimate) -> float:
    """The minimum detectable effect: the true effect this estimate would call non-zero with 80% power
    (two-sided, ALPHA), from its standard error and degrees of freedom."""
    if not est.ok:
        return math.nan
    top = 4.0 * est.se
    while power(top, est.se, est.df) < POWER:  # 1 degree of freedom asks for about 30 standard errors
        top *= 2
    return float(optimize.brentq(lambda d: power(d, est.se, est.df) - POWER, 0.0, top, xtol=1e-9 * top))


def seeds_needed(
    est: Estimate, effect: float | None, least: int = 2, most: int = 1000, alpha: float = ALPHA
) -> int | None:
    """Seeds (replicates) for 80% power to tell ``effect`` from no effect at ``alpha``, never fewer than
    ``least``, from the variance measured so far: its runs' part shrinks as 1 / seeds (and its degrees of
    freedom grow with them), its images' part does not. None: nothing to detect, or not reachable by seeds
    (the test set's own noise is too large)."""
    if effect is None or not est.ok or est.noise_df < 1:
        return None
    for seeds in range(max(least, 1), most + 1):
        run_df = est.noise_df + est.df_per_seed * (seeds - est.n)
        if run_df < 1:
            continue
        df = max(1.0, est.df * run_df / est.noise_df)
        se = math.sqrt(est.run_part * est.n / seeds + est.image_part)
        if power(effect, se, df, alpha) >= POWER:
            return seeds
    return None


def pairing_gain(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """(the correlation of two arms' per-seed errors, the variance an unpaired comparison would have over
    the paired one): what common random numbers bought."""
    seeds = sorted(a.keys() & b.keys())
    if len(seeds) < 3:
        return math.nan, math.nan
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    if x.std() == 0 or y.std() == 0:
        return math.nan, math.nan
    paired = float(np.var(x - y, ddof=1))
    unpaired = float(np.var(x, ddof=1) + np.var(y, ddof=1))
    return float(np.corrcoef(x, y)[0, 1]), unpaired / paired if paired > 0 else math.inf
