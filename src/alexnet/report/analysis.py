"""From runs to rows: each claim measured in each context where its arms were run.

- ``delta``: the paper's arm minus the claim's arm, paired by seed, image by image.
- ``views``: within the paper arm's runs, one metric minus another (ten views vs the centre crop).
- ``ratio``: Figure 1's speed ratio (alexnet.report.figure1).
- ``factorial``: the main effects and interaction chains of a fractional factorial design.

Every row then gets its p-values, its verdict before and after Holm's correction across the report, its
minimum detectable effect and the seeds it would need (alexnet.report.stats).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from alexnet.report import stats
from alexnet.report.claims import PAPER_ARM, Claim, Measure, all_arm_keys, level_of, load_arm
from alexnet.report.runs import (
    RunRecord,
    by_context,
    command,
    describe,
    digest,
    latest_by_seed,
    setting_of,
)


@dataclass
class Settings:
    min_seeds: int = 3
    margin: float = 0.5  # points of error: "no effect" means the interval lies within +-margin
    ratio_margin: float = 1.25  # for a ratio: within [1/1.25, 1.25]


@dataclass
class Row:
    claim: Claim
    label: str  # what is measured
    section: str  # the table it belongs to: its scale and the paper arm's config
    context: str
    estimate: stats.Estimate
    reported: float | None
    direction: int
    unit: str  # "pp" (points of error) or "x" (a ratio; the estimate is its log)
    runs: list[RunRecord]
    command: str
    not_finished: list[RunRecord] = field(default_factory=list)
    setting: dict[str, str] = field(default_factory=dict)  # the paper arm's params that fix the section
    notes: list[str] = field(default_factory=list)
    per_seed: dict[int, float] = field(default_factory=dict)
    compared: dict[int, tuple[float, float]] = field(default_factory=dict)  # per seed: both sides, in points
    correlation: tuple[float, float] = (math.nan, math.nan)
    test: stats.Test = field(default_factory=stats.Test)
    verdict: str = "inconclusive"
    adjusted_verdict: str = "inconclusive"
    mde: float = math.nan
    seeds_needed: int | None = None
    undecidable: str | None = None  # why no verdict can be given, whatever the interval (a censored baseline)

    @property
    def key(self) -> str:
        """A name for MLflow: the claim, the measure and the context."""
        label = re.sub(r"[^A-Za-z0-9_-]+", "_", self.label).strip("_")
        return f"{self.claim.name}.{label}.{self.context}"


def section_of(paper_run: RunRecord, tune: tuple[str, ...] = ()) -> str:
    """A comparison's table: its scale, and the paper arm's config with every switch an arm flips left out,
    so that claims measured against the same paper runs share one table."""
    return f"{describe(paper_run)} (config {digest(section_setting(paper_run, tune))})"


def section_setting(paper_run: RunRecord, tune: tuple[str, ...] = ()) -> dict[str, str]:
    """The params behind ``section_of``'s config digest."""
    return setting_of(paper_run, all_arm_keys() | set(tune))


def name_sections(rows: list[Row]) -> None:
    """Tables whose headings would differ only in their config digest (the same scale, a schedule or rate
    apart) name the keys in which their paper runs differ, so a reader can tell them apart."""
    alike: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)  # scale -> heading -> setting
    for row in rows:
        alike[row.section.partition(" (config ")[0]][row.section] = row.setting
    renamed = {}
    for settings in alike.values():
        keys = sorted({k for setting in settings.values() for k in setting})
        differ = [k for k in keys if len({setting.get(k) for setting in settings.values()}) > 1]
        for heading, setting in settings.items():
            if differ:
                named = ", ".join(f"{k}={setting.get(k, '-')}" for k in differ)
                renamed[heading] = heading.replace(" (config ", f", {named} (config ", 1)
    for row in rows:
        row.section = renamed.get(row.section, row.section)


OUTCOME_OF = {
    "test/top1_err_1crop": "top1_1crop",
    "test/top5_err_1crop": "top5_1crop",
    "test/top1_err_10crop": "top1_10crop",
    "test/top5_err_10crop": "top5_10crop",
}


def errors(runs: list[RunRecord], metrics: list[str]) -> tuple[np.ndarray, str]:
    """(runs, images) errors in points for ``runs[i]`` on ``metrics[i]``, image by image when every run
    kept its outcomes on the same test images; otherwise (runs, 1) of the logged error rates."""
    pairs = list(zip(runs, metrics, strict=True))
    same_images = len({r.labels_sha for r in runs}) == 1
    if same_images and all(r.outcomes is not None and OUTCOME_OF.get(m) in r.outcomes for r, m in pairs):
        return 100.0 * np.stack([1.0 - r.outcomes[OUTCOME_OF[m]] for r, m in pairs]), "seeds x images"
    return 100.0 * np.array([[r.metrics[m]] for r, m in pairs]), "seeds only"


def paired(
    first: dict[int, RunRecord], second: dict[int, RunRecord], metrics: tuple[str, str]
) -> tuple[stats.Estimate, dict[int, float], str]:
    """``first`` minus ``second``, seed by seed (the seeds as blocks: common random numbers)."""
    seeds = [s for s in sorted(first.keys() & second.keys())
             if metrics[0] in first[s].metrics and metrics[1] in second[s].metrics]  # fmt: skip
    per_seed = {s: 100.0 * (first[s].metrics[metrics[0]] - second[s].metrics[metrics[1]]) for s in seeds}
    if len(seeds) < 2:  # no interval from one seed
        mean = next(iter(per_seed.values()), math.nan)
        return stats.Estimate(mean, math.nan, 0, len(seeds), method="one seed"), per_seed, ""
    n = len(seeds)
    y, method = errors(
        [first[s] for s in seeds] + [second[s] for s in seeds], [metrics[0]] * n + [metrics[1]] * n
    )
    x = np.zeros((2 * n, n + 1))
    x[:n, 0] = 1.0  # first's level
    x[np.arange(2 * n), 1 + np.tile(np.arange(n), 2)] = 1.0  # the seed's block
    est = stats.crossed(y, x, np.eye(n + 1)[0], seeds=n)
    est.method = method
    return est, per_seed, method


def analyse(
    claims: list[Claim], runs: list[RunRecord], settings: Settings, client=None
) -> tuple[list[Row], list]:
    from alexnet.report import factorial  # it builds on this module's rows

    rows: list[Row] = []
    curves: list = []
    for claim in claims:
        mine = [r for r in runs if r.arch == claim.arch]
        if claim.kind == "factorial":
            rows += factorial.rows(claim, mine, settings)
            continue
        for arm in [load_arm(name) for name in claim.arms] or [None]:
            rows += _claim_rows(claim, arm, mine, client, curves)
    name_sections(rows)
    judge(rows, settings)
    return rows, curves


def _claim_rows(claim: Claim, arm, mine: list[RunRecord], client, curves: list) -> list[Row]:
    """One claim (against one of its arms) in every context that ran both arms."""
    from alexnet.report import figure1

    rows = []
    ignore = (arm.keys if arm else frozenset()) | set(claim.tune)
    # views: the paper arm's runs alone; otherwise each run's level on the arm's own switches
    level = {id(r): r.arm if arm is None else level_of(r.params, arm) for r in mine}
    members = [r for r in mine if level[id(r)] is not None]
    for context, group in by_context(members, ignore).items():
        a = [r for r in group if level[id(r)] == PAPER_ARM]
        b = [r for r in group if level[id(r)] not in (PAPER_ARM, None)]
        if not a or (claim.kind != "views" and not b):
            continue  # this claim's other arm was not run in this context
        text = section_of(a[0], claim.tune)
        for measure in claim.measures:
            if claim.kind == "ratio":
                row, fig = figure1.ratio_row(claim, measure, context, text, a, b, client)
                curves += [fig] if fig is not None else []
            else:
                row = _delta_row(claim, measure, context, text, a, b)
            if len(claim.arms) > 1:
                row.label += f" ({arm.name})"
            row.setting = section_setting(a[0], claim.tune)
            row.not_finished = [r for r in group if not r.finished]
            rows.append(row)
    return rows


def _delta_row(
    claim: Claim, measure: Measure, context: str, text: str, a: list[RunRecord], b: list[RunRecord]
) -> Row:
    first = latest_by_seed(a)
    if claim.kind == "views":  # the same runs, two metrics
        second, metrics = first, (measure.metric, measure.baseline_metric)
    else:
        second, metrics = latest_by_seed(b), (measure.metric, measure.metric)
    est, per_seed, method = paired(first, second, metrics)
    used = [first[s] for s in per_seed] + ([second[s] for s in per_seed] if claim.kind != "views" else [])
    row = Row(
        claim=claim, label=_label(measure), section=text, context=context, estimate=est,
        reported=measure.reported, direction=claim.direction, unit="pp", runs=used, per_seed=per_seed,
        command=command(a + b, claim.sweep, per_seed or None),
    )  # fmt: skip
    row.compared = {s: (100.0 * first[s].metrics[metrics[0]], 100.0 * second[s].metrics[metrics[1]])
                    for s in per_seed}  # fmt: skip
    unpaired = max(len(first), len(second)) - len(per_seed)
    if unpaired and claim.kind != "views":
        row.notes.append(f"{unpaired} run(s) without a partner of the same seed in the other arm: not used")
    if method == "seeds only":
        row.notes.append("no per-image test outcomes in these runs: the interval holds the seeds' noise only")
    if claim.kind != "views":  # the same pairs, in points (a correlation and a variance ratio: any unit)
        row.correlation = stats.pairing_gain(*({s: v[i] for s, v in row.compared.items()} for i in (0, 1)))
    if claim.against_overfitting and measure.metric == TEST_ERROR:
        row.notes += overfitting([second[s] for s in per_seed])
    return row


TRAIN_ERROR = "final/train_top1_err"  # the last epoch's, in training mode (augmented, dropout where on)
TEST_ERROR = "test/top1_err_1crop"  # the error it is set against


def overfitting(without: list[RunRecord]) -> list[str]:
    """Whether the runs without a regulariser overfit: a claim made against overfitting (section 4) can
    only show where there is some to reduce."""
    runs = [r for r in without if TRAIN_ERROR in r.metrics and TEST_ERROR in r.metrics]
    if not runs:
        return []
    train = 100.0 * float(np.mean([r.metrics[TRAIN_ERROR] for r in runs]))
    test = 100.0 * float(np.mean([r.metrics[TEST_ERROR] for r in runs]))
    seeds = f"means of {len(runs)} seeds" if len(runs) > 1 else "one seed"
    said = (f"without it, the runs end at {train:.1f}% training error (the last epoch's, in training mode) "
            f"and {test:.1f}% test error ({seeds})")  # fmt: skip
    if test <= train:
        return [said + ": they do not overfit, so this row measures what the switch costs at this length of "
                "training, not what it buys against overfitting, the paper's reason for it"]  # fmt: skip
    return [said + f": test error is {test - train:.1f} points above training error"]


def _label(measure: Measure) -> str:
    if measure.label:
        return measure.label
    return f"{measure.metric} vs {measure.baseline_metric}" if measure.baseline_metric else measure.metric


def judge(rows: list[Row], settings: Settings) -> None:
    """p-values, Holm's correction across every row of the report, verdicts, power."""
    for row in rows:
        ratio = row.unit == "x"
        margin = math.log(settings.ratio_margin) if ratio else settings.margin
        reported = None if row.reported is None else (math.log(row.reported) if ratio else row.reported)
        row.test = stats.test(row.estimate, reported, margin)
        row.mde = stats.mde(row.estimate)
        row.seeds_needed = stats.seeds_needed(row.estimate, reported)
    stats.adjust([row.test for row in rows])
    for row in rows:
        ratio = row.unit == "x"
        reported = None if row.reported is None else (math.log(row.reported) if ratio else row.reported)
        raw = {k: getattr(row.test, k) for k in ("p_zero", "p_paper", "p_equiv")}
        adjusted = {k: row.test.adjusted.get(k, v) for k, v in raw.items()}
        noise_df = row.estimate.noise_df
        row.verdict = stats.verdict(
            row.estimate.mean, raw, reported, row.direction, noise_df, settings.min_seeds
        )
        row.adjusted_verdict = stats.verdict(
            row.estimate.mean, adjusted, reported, row.direction, noise_df, settings.min_seeds
        )
        if row.undecidable:
            row.verdict = row.adjusted_verdict = "inconclusive"
