"""Whether the report's statistics keep their promises, checked on simulated per-image test outcomes.

Drives the report's own code (``analysis.paired``, ``factorial._effects``, ``rows.judge``) on in-memory
RunRecords whose outcomes come from a logistic model of an image's chance of being misclassified: image
difficulty, a seed's shift, seed x image noise that every arm of a seed shares (common random numbers),
arm effects that vary from seed to seed and from image to image, a 2^(7-3) factorial whose main effects
each have their own seed-to-seed SD, and a whole report of conf/claims.yaml's 11 one-switch rows that share
the paper arm's runs, as the report's rows do. A true effect is the expected difference of error rates over
the images and the seeds, in points, by Monte Carlo on a large sample of both.

Prints one line per case, ``coverage <case> <value>`` (the 95% interval holds the truth) or ``familywise
<case> <value>`` (some corrected verdict of a family is wrong, by ``stats.wrong``), then a summary; exits 1
when a target is missed: for 3 to 6 seeds, coverage >= 0.93 and familywise <= 0.06 (docs/statistics.md).

    python benchmarks/statistics_coverage.py [--quick] [--replicates N] [--seed S] [--images I]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import optimize
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from alexnet.design import Design  # noqa: E402
from alexnet.report import factorial, stats  # noqa: E402
from alexnet.report.analysis import paired  # noqa: E402
from alexnet.report.claims import Claim, load_claims  # noqa: E402
from alexnet.report.rows import Row, Settings, judge  # noqa: E402
from alexnet.report.runs import RunRecord  # noqa: E402

TOP1, TOP5 = "test/top1_err_1crop", "test/top5_err_1crop"
OUTCOME = {TOP1: "top1_1crop", TOP5: "top5_1crop"}
COVERAGE_TARGET, FAMILYWISE_TARGET = 0.93, 0.06
SEEDS = (3, 4, 6)
FULL = {"replicates": 1000, "images": 10_000, "draws": 2_000_000}
QUICK = {"replicates": 400, "images": 2_000, "draws": 500_000}
# Below this many replicates a case's rate is allowed this many binomial standard errors past its target:
# a miss must be more than Monte Carlo noise.
STRICT_FROM, TOLERANCE_SE = 1000, 3.0

# The 11 one-switch rows of a report (conf/claims.yaml's delta claims, depth's three arms): each arm's true
# top-1 effect ("paper": the paper's number, "half": half of it, or points) and its seed-to-seed SD (points).
REPORT = {
    "tanh": (-3.0, 1.8), "sigmoid": (0.0, 0.2), "lrn_off": ("paper", 1.8),
    "pool_non_overlapping": ("half", 0.2), "one_column": (0.0, 1.8), "pca_color_off": ("half", 0.2),
    "crops_flips_off": (-2.0, 1.0), "dropout_off": (0.0, 1.0), "no_conv3": ("paper", 0.2),
    "no_conv4": ("half", 1.8), "no_conv5": (0.0, 0.5),
}  # fmt: skip
TOP5_TRUTH = {"tanh": -2.0, "lrn_off": "paper", "pool_non_overlapping": 0.0, "one_column": "half"}
# The factorial's factors: (main effect, its seed-to-seed SD), both in points; the SDs differ on purpose.
FACTORS = {
    "lrn_off": (-1.4, 1.8), "pool_non_overlapping": (-0.4, 0.2), "tanh": (-3.0, 1.0),
    "dropout_off": (-1.0, 1.8), "crops_flips_off": (-2.0, 0.5), "pca_color_off": (-1.0, 0.1),
    "one_column": (-1.7, 0.2),
}  # fmt: skip
ROWS = {"primary": "11 top-1 rows", "secondary": "4 top-5 rows", "both": "15 rows"}
# One real interaction (logits): dropping both regularisers costs more than the sum of dropping each.
BOTH_OFF = ("dropout_off", "crops_flips_off", 0.1)


@dataclass(frozen=True)
class World:
    """The population, in logits of an image's chance of being misclassified."""

    top1: float = -1.0  # about 30% top-1 error
    top5: float = -3.2  # about 9% top-5 error
    image_sd: float = 1.5  # image difficulty
    seed_sd: float = 0.3  # a seed's shift, in every arm
    crn_sd: float = 1.0  # seed x image: what a seed's weights and data order do to one image, in every arm
    arm_image_sd: float = 0.5  # how an arm's effect varies from image to image

    @property
    def shared_sd(self) -> float:
        return math.hypot(self.image_sd, self.seed_sd, self.crn_sd)


@dataclass(frozen=True)
class Arm:
    name: str
    beta: float  # the arm's shift of the top-1 logit
    seed_sd: float  # its seed-to-seed SD, in logits
    beta5: float = 0.0  # of the top-5 logit


class Truth:
    """A large sample of the population (images and seeds): a true effect is a mean over it."""

    def __init__(self, world: World, draws: int, rng: np.random.Generator) -> None:
        self.world, self.draws, self.rng = world, draws, rng
        self.shared = rng.normal(0, world.shared_sd, draws)  # what both arms of one seed share on one image
        self.arm_image, self.arm_seed = rng.normal(0, 1, draws), rng.normal(0, 1, draws)
        p = expit(world.top1 + self.shared)
        self.points_per_logit = 100 * float((p * (1 - p)).mean())  # to set SDs in points
        self.worst_se = 0.0  # the largest Monte Carlo SE of a truth so far, in points
        self._betas: dict[tuple[float, float, float], float] = {}

    def delta(self, beta: float, seed_sd: float, base: float) -> np.ndarray:
        """The paper arm minus the arm, per draw, in points."""
        shift = beta + self.world.arm_image_sd * self.arm_image + seed_sd * self.arm_seed
        return 100 * (expit(base + self.shared) - expit(base + self.shared + shift))

    def calibrate(self, target: float, seed_sd: float, base: float) -> float:
        """The arm's logit shift whose true effect is ``target`` points (a seed-to-seed SD alone moves the
        mean error, so even a null arm needs one)."""
        if (target, seed_sd, base) in self._betas:
            return self._betas[target, seed_sd, base]
        beta = optimize.brentq(lambda b: self.delta(b, seed_sd, base).mean() - target, -8, 8, xtol=1e-12)
        self._betas[target, seed_sd, base] = beta
        self.worst_se = max(self.worst_se, float(self.delta(beta, seed_sd, base).std()) / self.draws**0.5)
        return beta


def record(name: str, seed: int, wrong: dict[str, np.ndarray]) -> RunRecord:
    """A finished run as the report reads it back: per-image outcomes (True = correct) and error rates."""
    return RunRecord(
        run_id=name, name=name, status="FINISHED", seed=seed, start=0, end=0, params={}, tags={},
        metrics={m: float(w.mean()) for m, w in wrong.items()}, labels_sha="simulated",
        outcomes={OUTCOME[m]: ~w for m, w in wrong.items()},
    )  # fmt: skip


def shared_noise(world: World, seeds: int, images: int, rng: np.random.Generator) -> np.ndarray:
    """(seeds, images): image difficulty + each seed's shift + seed x image, the same in every arm."""
    difficulty = rng.normal(0, world.image_sd, images)
    shift = rng.normal(0, world.seed_sd, (seeds, 1))
    return difficulty + shift + rng.normal(0, world.crn_sd, (seeds, images))


def simulate(
    world: World, arms: list[Arm], seeds: int, images: int, rng: np.random.Generator, top5: bool = False
) -> tuple[dict[int, RunRecord], list[dict[int, RunRecord]]]:
    """One study: the paper arm's runs and each arm's, seeds 1..n, all on one fresh draw of test images."""
    shared = shared_noise(world, seeds, images, rng)
    shifts = [(0.0, 0.0, np.zeros((1, 1)))]
    for arm in arms:
        noise = rng.normal(0, world.arm_image_sd, images) + rng.normal(0, arm.seed_sd, (seeds, 1))
        shifts.append((arm.beta, arm.beta5, noise))
    out = []
    for k, (beta, beta5, noise) in enumerate(shifts):
        # one uniform per run and image for both metrics: a run's top-1 and top-5 errors go together
        uniform = rng.random((seeds, images))
        wrong = {TOP1: uniform < expit(world.top1 + shared + beta + noise)}
        if top5:
            wrong[TOP5] = uniform < expit(world.top5 + shared + beta5 + noise)
        out.append(
            {s + 1: record(f"{k}-{s + 1}", s + 1, {m: w[s] for m, w in wrong.items()}) for s in range(seeds)}
        )
    return out[0], out[1:]


@contextlib.contextmanager
def fast_report():
    """The report's code, less costs no verdict depends on: conf/claims.yaml read once (factorial reads it
    for every effect); the power columns (MDE, seeds for 80%), which judge fills in but no verdict reads (a
    row whose paper number the test set cannot resolve searches up to 1,000 seeds); and the full garbage
    collection statsmodels' Holm runs on every call (a third of a second with MLflow's modules loaded):
    the objects alive now are frozen out of it."""
    saved = factorial.load_claims, stats.mde, stats.seeds_needed
    claims = load_claims()
    factorial.load_claims = lambda: claims
    stats.mde, stats.seeds_needed = (lambda est: math.nan), (lambda *a, **k: None)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        factorial.load_claims, stats.mde, stats.seeds_needed = saved


def paired_coverage(
    truth: Truth, seeds: int, seed_sd_points: float, replicates: int, images: int, rng: np.random.Generator
) -> float:
    """How often one one-switch delta's 95% interval (analysis.paired) holds its true effect, -1.4 points."""
    target, seed_sd = -1.4, seed_sd_points / truth.points_per_logit
    arm = Arm("lrn_off", truth.calibrate(target, seed_sd, truth.world.top1), seed_sd)
    covered = 0
    for _ in range(replicates):
        paper, (other,) = simulate(truth.world, [arm], seeds, images, rng)
        est, _, _ = paired(paper, other, (TOP1, TOP1))
        covered += est.low <= target <= est.high
    return covered / replicates


@dataclass
class FactorialModel:
    """The 2^(7-3) design's simulation: each factor's logit shift at its arm's level and its seed-to-seed SD
    (logits), one real interaction, and the true effects in factorial._effects's order (points): the
    design's contrasts of the expected error at each of its 16 points, over the images and the seeds."""

    design: Design
    beta: np.ndarray
    seed_sd: np.ndarray
    off: np.ndarray  # (points, factors): 1 where the factor is at its arm's level
    both: np.ndarray  # (points,): the interaction's logit
    truths: np.ndarray = field(default_factory=lambda: np.zeros(0))  # 7 main effects, then 7 chains

    @classmethod
    def build(cls, truth: Truth, design: Design) -> FactorialModel:
        slope = truth.points_per_logit
        off = (1 - design.matrix) / 2
        i, j = (design.factors.index(f) for f in BOTH_OFF[:2])
        model = cls(design, np.array([-FACTORS[f][0] / slope for f in design.factors]),
                    np.array([FACTORS[f][1] / slope for f in design.factors]), off,
                    BOTH_OFF[2] * off[:, i] * off[:, j])  # fmt: skip
        expected, chunk = np.zeros(design.runs), 250_000
        for start in range(0, truth.draws, chunk):
            m = min(chunk, truth.draws - start)
            effect = model.effects(truth.world, truth.rng, (m, 7), (m, 7))
            logit = truth.world.top1 + truth.shared[start : start + m, None] + effect @ off.T + model.both
            expected += 100 * expit(logit).sum(axis=0)
        x = design.matrix.astype(float)
        chains = [x[:, c[0][0]] * x[:, c[0][1]] for c in design.interaction_chains]
        columns = [x[:, k] for k in range(7)] + chains
        model.truths = 2 / design.runs * np.array(columns) @ (expected / truth.draws)
        return model

    def effects(self, world: World, rng: np.random.Generator, image_shape, seed_shape) -> np.ndarray:
        """Each factor's shift: its mean, an image's own part and a seed's own part."""
        image = rng.normal(0, world.arm_image_sd, image_shape)
        return self.beta + image + rng.normal(0, 1, seed_shape) * self.seed_sd


def factorial_study(
    model: FactorialModel, claim: Claim, world: World, seeds: int, replicates: int, images: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """(each main effect's coverage, each chain's, the familywise error of the main effects' corrected
    verdicts): factorial._effects on replicates of the 16-run design, then rows.judge."""
    design, runs = model.design, model.design.runs
    covered, errors = np.zeros(len(model.truths)), 0
    for _ in range(replicates):
        shared = shared_noise(world, seeds, images, rng)
        effect = model.effects(world, rng, (1, images, 7), (seeds, 1, 7))  # (seeds, images, factors)
        logit = world.top1 + shared[:, None, :] + np.einsum("pj,sij->spi", model.off, effect)
        wrong = rng.random(logit.shape) < expit(logit + model.both[None, :, None])
        ordered = [record(f"{s}-{p}", s + 1, {TOP1: wrong[s, p]}) for s in range(seeds) for p in range(runs)]
        rows = factorial._effects(claim, design, TOP1, list(range(1, seeds + 1)), ordered, "sim", "factorial")
        pairs = list(zip(rows, model.truths, strict=True))
        covered += [r.estimate.low <= t <= r.estimate.high for r, t in pairs]
        judge(rows, Settings())
        errors += any(_wrong(r, t) for r, t in pairs if r.primary)
    return covered[:7] / replicates, covered[7:] / replicates, errors / replicates


def _wrong(row: Row, truth: float, adjusted: bool = True) -> bool:
    verdict = row.adjusted_verdict if adjusted else row.verdict
    return stats.wrong(verdict, truth, row.reported, row.direction, Settings().margin)


def report_plan(
    truth: Truth, null: bool, top5: bool
) -> list[tuple[Claim, Arm, list[tuple[str, float | None, float]]]]:
    """The report's one-switch rows: (claim, its arm, [(metric, the paper's number, the true effect)])."""

    def resolve(value, reported: float | None) -> float:
        if null:
            return 0.0
        return {"paper": reported, "half": None if reported is None else reported / 2}.get(value, value)

    plan = []
    for claim in load_claims():
        for name in claim.arms if claim.kind == "delta" else ():
            value, sd_points = REPORT[name]
            reported = {m.metric: m.reported for m in claim.measures}
            seed_sd = sd_points / truth.points_per_logit
            t1 = resolve(value, reported[TOP1])
            beta = truth.calibrate(t1, seed_sd, truth.world.top1)
            measured = [(TOP1, reported[TOP1], t1)]
            beta5 = 0.0
            if top5 and TOP5 in reported:
                t5 = resolve(TOP5_TRUTH[name], reported[TOP5])
                beta5 = truth.calibrate(t5, seed_sd, truth.world.top5)
                measured.append((TOP5, reported[TOP5], t5))
            plan.append((claim, Arm(name, beta, seed_sd, beta5), measured))
    return plan


def report_familywise(
    truth: Truth, seeds: int, replicates: int, images: int, rng: np.random.Generator, null=False, top5=False
) -> dict[str, tuple[float, float]]:
    """Per family (and for both together): (the rate of replicates where some corrected verdict is wrong,
    the same for the uncorrected verdicts), the rows judged as one report section by rows.judge."""
    plan = report_plan(truth, null, top5)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _ in range(replicates):
        paper, others = simulate(truth.world, [arm for _, arm, _ in plan], seeds, images, rng, top5)
        rows = []
        for (claim, arm, measured), other in zip(plan, others, strict=True):
            for metric, reported, true in measured:
                est, per_seed, _ = paired(paper, other, (metric, metric))
                row = Row(
                    claim=claim, label=f"{metric} ({arm.name})", section="simulated", context="sim",
                    estimate=est, reported=reported, direction=claim.direction, unit="pp", runs=[],
                    command="", per_seed=per_seed, metric=metric, primary=metric == claim.primary,
                )  # fmt: skip
                rows.append((row, true))
        judge([r for r, _ in rows], Settings())
        for adjusted in (0, 1):
            wrong = {fam: any(_wrong(r, t, bool(adjusted)) for r, t in rows if r.family[1] == fam)
                     for fam in ("primary", "secondary")}  # fmt: skip
            wrong["both"] = wrong["primary"] or wrong["secondary"]
            for fam, w in wrong.items():
                counts[fam][adjusted] += w
    return {fam: (c[1] / replicates, c[0] / replicates) for fam, c in counts.items()}


@dataclass
class Line:
    kind: str  # coverage | familywise
    case: str
    value: float
    replicates: int
    note: str = ""
    target: bool = True  # n = 2 and the pooled 'both families' rate have none

    def missed(self, tolerance_se: float) -> bool:
        if not self.target:
            return False
        nominal = 0.95 if self.kind == "coverage" else 0.05
        slack = tolerance_se * math.sqrt(nominal * (1 - nominal) / self.replicates)
        if self.kind == "coverage":
            return self.value < COVERAGE_TARGET - slack
        return self.value > FAMILYWISE_TARGET + slack

    def __str__(self) -> str:
        return f"{self.kind} {self.case} {self.value:.3f}  # {self.replicates} replicates" + (
            f"; {self.note}" if self.note else ""
        )


def run_cases(replicates: int, images: int, draws: int, seed: int, seeds=SEEDS, echo=print) -> list[Line]:
    """Every case, each on its own random stream (so that one case's numbers do not depend on the others)."""
    truth = Truth(World(), draws, np.random.default_rng([seed, 0]))
    claim = next(c for c in load_claims() if c.kind == "factorial")
    lines: list[Line] = []

    def rng(case: str) -> np.random.Generator:
        return np.random.default_rng([seed, zlib.crc32(case.encode())])

    def emit(line: Line) -> None:
        lines.append(line)
        echo(str(line))

    with fast_report():
        for n in seeds:
            for size, sd in (("small", 0.2), ("large", 1.8)):
                case = f"paired_{size}_n{n}"
                value = paired_coverage(truth, n, sd, replicates, images, rng(case))
                emit(Line("coverage", case, value, replicates, f"seed x arm SD {sd} pts, truth -1.4 pts"))
        model = FactorialModel.build(truth, claim.design())
        for n in (2, *seeds):
            main, chain, fw = factorial_study(
                model, claim, truth.world, n, replicates, images, rng(f"factorial_n{n}")
            )
            worst = model.design.factors[int(np.argmin(main))]
            extra = "" if n > 2 else "; n = 2: no target"
            emit(Line("coverage", f"factorial_main_n{n}", float(main.min()), replicates,
                      f"min over 7 main effects (lowest: {worst}, seed SD {FACTORS[worst][1]} pts), mean "
                      f"{main.mean():.3f}{extra}", n > 2))  # fmt: skip
            emit(Line("coverage", f"factorial_chain_n{n}", float(chain.min()), replicates,
                      f"min over 7 interaction chains, mean {chain.mean():.3f}{extra}", n > 2))  # fmt: skip
            if n > 2:
                emit(Line("familywise", f"factorial_n{n}", fw, replicates, "the 7 main effects' family"))
        for n in seeds:
            for case, null, top5 in (("report", 0, 0), ("null", 1, 0), ("two_families", 0, 1)):
                rates = report_familywise(truth, n, replicates, images, rng(f"{case}_n{n}"), null, top5)
                for fam in ("primary", "secondary", "both") if top5 else ("primary",):
                    name = f"{case}_n{n}" + (f"_{fam}" if top5 else "")
                    note = f"{ROWS[fam]}; uncorrected verdicts: {rates[fam][1]:.3f}"
                    if fam == "both":
                        note += "; no target: the guarantee is per family"
                    emit(Line("familywise", name, rates[fam][0], replicates, note, fam != "both"))
    echo(f"# truths: Monte Carlo over {draws:,} draws of images and seeds, SE <= {truth.worst_se:.4f} pts")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer replicates and test images (about 1 min)")
    parser.add_argument("--replicates", type=int, help="simulated studies per case")
    parser.add_argument("--images", type=int, help="test images per study")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    replicates, images = args.replicates or scale["replicates"], args.images or scale["images"]
    tolerance = TOLERANCE_SE if replicates < STRICT_FROM else 0.0
    print(f"# statistics coverage: {replicates} replicates a case, {images:,} test images, seed {args.seed}; "
          f"targets for 3 to 6 seeds: coverage >= {COVERAGE_TARGET}, familywise <= {FAMILYWISE_TARGET}"
          + (f", less {tolerance:.0f} binomial SEs of Monte Carlo noise (fewer than {STRICT_FROM} replicates)"
             if tolerance else ""), flush=True)  # fmt: skip
    start = time.perf_counter()
    lines = run_cases(replicates, images, scale["draws"], args.seed, echo=lambda s: print(s, flush=True))
    missed = [line for line in lines if line.missed(tolerance)]
    print(f"summary: {len(lines)} cases, {sum(line.target for line in lines)} with a target, "
          f"{len(missed)} missed ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    for line in missed:
        print(f"MISSED {line.kind} {line.case} {line.value:.3f}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
