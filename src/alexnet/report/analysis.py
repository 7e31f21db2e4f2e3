"""From runs to rows: each claim measured in each context where its arms were run.

- ``delta``: the paper's arm minus the claim's arm, paired by seed, image by image.
- ``views``: within the paper arm's runs, one metric minus another (ten views vs the centre crop).
- ``ratio``: Figure 1's speed ratio (alexnet.report.figure1).
- ``factorial``: the main effects and interaction chains of a fractional factorial design.

Every row then gets its p-values, its verdict before and after Holm's correction within its family, its
minimum detectable effect and the seeds it would need (alexnet.report.rows.judge).
"""

from __future__ import annotations

import math

import numpy as np

from alexnet.report import factorial, figure1, stats
from alexnet.report.claims import PAPER_ARM, Claim, Measure, level_of, load_arm
from alexnet.report.rows import Row, Settings, errors, judge, name_sections, section_of, section_setting
from alexnet.report.runs import RunRecord, by_context, command, latest_by_seed


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
    est = stats.per_seed(y[:n] - y[n:])  # the seeds as blocks: each seed's own delta, image by image
    est.method = method
    return est, per_seed, method


def analyse(claims: list[Claim], runs: list[RunRecord], settings: Settings) -> tuple[list[Row], list]:
    rows: list[Row] = []
    curves: list = []
    for claim in claims:
        mine = [r for r in runs if r.arch == claim.arch]
        if claim.kind == "factorial":
            rows += factorial.rows(claim, mine, settings)
            continue
        for arm in [load_arm(name) for name in claim.arms] or [None]:
            rows += _claim_rows(claim, arm, mine, curves)
    name_sections(rows)
    judge(rows, settings)
    return rows, curves


def _claim_rows(claim: Claim, arm, mine: list[RunRecord], curves: list) -> list[Row]:
    """One claim (against one of its arms) in every context that ran both arms."""
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
                row, fig = figure1.ratio_row(claim, measure, context, text, a, b)
                curves += [fig] if fig is not None else []
            else:
                row = _delta_row(claim, measure, context, text, a, b)
            if len(claim.arms) > 1:
                row.label += f" ({arm.name})"
            row.metric, row.primary = measure.metric, measure.metric == claim.primary
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
    if claim.kind != "views" and measure.metric == TEST_ERROR:
        row.notes += take_off(first, second, list(per_seed))
    return row


TAKE_OFF = 0.70  # training error (in training mode) below which a run has started to learn: chance is 0.90


def take_off_epoch(run: RunRecord) -> int | None:
    """The first epoch whose training error is below TAKE_OFF (None: never, or no history)."""
    curve = run.history.get("train/top1_err", [])
    return next((epoch for epoch, error in enumerate(curve, 1) if error < TAKE_OFF), None)


def take_off(first: dict[int, RunRecord], second: dict[int, RunRecord], seeds: list[int]) -> list[str]:
    """When each arm started to learn, seed by seed. Where the arms differ, part of the delta is how fast
    each got going rather than where it ended (why the annealed protocol warms up: docs/protocol.md)."""
    epochs = {s: (take_off_epoch(first[s]), take_off_epoch(second[s])) for s in seeds}
    if not epochs or all(a is None and b is None for a, b in epochs.values()):
        return []
    shown = ", ".join(f"seed {s}: {a or '-'} and {b or '-'}" for s, (a, b) in epochs.items())
    said = f"take-off (first epoch with training error below {TAKE_OFF:.0%}), paper arm and other: {shown}"
    if any(a != b for a, b in epochs.values()):
        return [said + "; where they differ, part of the delta is how fast each arm got going"]
    return [said]


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
