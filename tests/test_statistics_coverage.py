"""benchmarks/statistics_coverage.py in small: the report's own intervals and Holm-corrected verdicts on
simulated outcomes (fixed seeds, fewer replicates and test images), each rate within Monte Carlo bands of
its promise: coverage not below 95% less 3 binomial standard errors, familywise error not above 5% plus 3."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from alexnet.report import factorial, stats

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "statistics_coverage.py"
_spec = importlib.util.spec_from_file_location("statistics_coverage", PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up while the file runs
_spec.loader.exec_module(bench)

IMAGES = 1000


def band(nominal: float, replicates: int) -> float:
    """3 binomial standard errors of a rate whose true value is ``nominal``."""
    return 3 * math.sqrt(nominal * (1 - nominal) / replicates)


@pytest.fixture(scope="module")
def truth():
    return bench.Truth(bench.World(), 200_000, np.random.default_rng([7, 0]))


@pytest.fixture
def report():
    with bench.fast_report():
        yield


def test_a_one_switch_interval_covers_its_truth_when_the_effect_varies_by_seed(truth, report):
    replicates = 300
    for sd in (0.2, 1.8):
        value = bench.paired_coverage(truth, 3, sd, replicates, IMAGES, np.random.default_rng([7, 1]))
        assert value >= 0.95 - band(0.95, replicates), (sd, value)


def test_factorial_effects_cover_and_their_family_stays_within_its_error_rate(truth, report):
    replicates = 150
    claim = next(c for c in bench.load_claims() if c.kind == "factorial")
    model = bench.FactorialModel.build(truth, claim.design())
    main, chain, familywise = bench.factorial_study(
        model, claim, truth.world, 3, replicates, 500, np.random.default_rng([7, 2])
    )
    assert main.shape == chain.shape == (7,)
    # the mean over effects (its band taken as if they were one effect: wider than it needs to be)
    assert main.mean() >= 0.95 - band(0.95, replicates), main
    assert chain.mean() >= 0.95 - band(0.95, replicates), chain
    assert familywise <= 0.05 + band(0.05, replicates)


@pytest.mark.parametrize(("null", "top5"), [(False, False), (True, False), (False, True)])
def test_a_whole_report_keeps_each_familys_error_rate(truth, report, null: bool, top5: bool):
    replicates = 200
    rates = bench.report_familywise(truth, 3, replicates, IMAGES, np.random.default_rng([7, 3]), null, top5)
    for family in ("primary", "secondary") if top5 else ("primary",):
        corrected, uncorrected = rates[family]
        assert corrected <= 0.05 + band(0.05, replicates), (family, rates)
        assert corrected <= uncorrected


def test_a_null_rows_p_value_holds_in_the_tail_where_holms_thresholds_sit(truth):
    """Holm tests the smallest p-value at 5% / rows, far in the tail. With Satterthwaite's degrees of freedom
    (estimated from the seed part they weigh) a null row crossed 5% / 22 five to eight times too often at 3
    seeds; with the runs' own degrees of freedom it does not: a row with no effect and much seed x arm noise
    (5 points) is called non-zero at 5% / 22 no more often than that."""
    replicates, level, seed_sd = 2000, 0.05 / 22, 5.0 / truth.points_per_logit
    arm = bench.Arm("lrn_off", truth.calibrate(0.0, seed_sd, truth.world.top1), seed_sd)
    rng = np.random.default_rng([7, 4])
    rejected = 0
    for _ in range(replicates):
        paper, (other,) = bench.simulate(truth.world, [arm], 3, 2000, rng)
        est, _, _ = bench.paired(paper, other, (bench.TOP1, bench.TOP1))
        rejected += stats.test(est, None, 0.5).p_zero < level
    assert rejected / replicates <= level + band(level, replicates)


def test_the_truths_are_the_targets_and_the_report_code_is_restored(truth):
    """A calibrated arm's true effect is its target (a null arm's is 0, though its seed noise alone moves
    the mean error), and fast_report puts back what it replaced."""
    seed_sd = 1.8 / truth.points_per_logit
    for target in (0.0, -1.4):
        beta = truth.calibrate(target, seed_sd, truth.world.top1)
        assert truth.delta(beta, seed_sd, truth.world.top1).mean() == pytest.approx(target, abs=1e-9)
    assert truth.calibrate(0.0, seed_sd, truth.world.top1) != 0.0
    originals = factorial.load_claims, stats.mde, stats.seeds_needed
    with bench.fast_report():
        assert stats.mde is not originals[1]
    assert (factorial.load_claims, stats.mde, stats.seeds_needed) == originals


def test_lines_have_the_documented_format_and_targets():
    line = bench.Line("coverage", "paired_small_n3", 0.9512, 1000, "seed x arm SD 0.2 pts")
    assert re.fullmatch(r"(coverage|familywise) \S+ \d\.\d{3}  # \d+ replicates; .*", str(line))
    assert str(line).startswith("coverage paired_small_n3 0.951  #")
    assert bench.Line("coverage", "c", 0.929, 1000).missed(0.0)
    assert not bench.Line("coverage", "c", 0.929, 200).missed(3.0)  # within 3 SEs of 200 replicates
    assert bench.Line("familywise", "f", 0.061, 1000).missed(0.0)
    assert not bench.Line("familywise", "f", 0.5, 1000, target=False).missed(0.0)
