"""A fractional factorial claim: every main effect and every two-factor alias chain the design separates,
each main effect beside the paper's delta for its switch.

A run is a point of the design when each factor's switches sit at the paper's level or at its arm's
(alexnet.report.claims.arm_of's test, factor by factor); its seed is its replicate. Only complete
replicates (every point of the design finished for that seed) enter, so the design stays orthogonal. An
effect is the mean at the paper's level minus the mean at the arm's level, in points of error (negative:
the paper's choice is better), as for a one-switch delta.

Each replicate measures every effect on its own, image by image, and an effect's interval comes from the
spread of its replicates' own values (alexnet.report.stats.per_seed: seeds - 1 degrees of freedom), not
from a residual pooled over the effects. A pooled residual is mostly seed x effect interactions, so an
effect that varies more from seed to seed than the others would borrow their smaller noise: its interval
would be too narrow (covering 80% of the time, not 95%, in benchmarks/statistics_coverage.py). The price
is that one replicate gives no interval, and two give one degree of freedom; the noise table says how many
replicates a row needs.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from alexnet.design import Design
from alexnet.report import stats
from alexnet.report.claims import PAPER_ARM, Claim, level_of, load_arm, load_claims
from alexnet.report.rows import Row, Settings, errors, section_of, section_setting
from alexnet.report.runs import RunRecord, by_context, command


def signs(design: Design, run: RunRecord) -> str | None:
    """The run's point of the design (``+-+...``), or None when a factor's switches sit at neither level."""
    levels = [level_of(run.params, load_arm(name)) for name in design.factors]
    if None in levels:
        return None
    return "".join("+" if level == PAPER_ARM else "-" for level in levels)


def _replicates(
    design: Design, runs: list[RunRecord]
) -> dict[str, tuple[list[tuple[RunRecord, str]], dict[int, dict[str, RunRecord]]]]:
    """Per context: its runs at a point of the design with their point (oldest first), and each seed's
    finished run at each point (the newest wins). A seed whose only point is the paper arm's run, which
    every replicate shares with the one-switch sweeps, has not started the design: it is left out."""
    points = {design.signs(i) for i in range(design.runs)}
    paper_only = {"+" * len(design.factors)}
    ignore = frozenset().union(*(load_arm(f).keys for f in design.factors))
    found = {}
    for context, group in by_context(runs, ignore).items():
        members = [(r, point) for r in group if (point := signs(design, r)) in points]
        by_seed: dict[int, dict[str, RunRecord]] = defaultdict(dict)
        for run, point in members:
            if run.finished and run.seed is not None:
                by_seed[run.seed][point] = run
        by_seed = {seed: got for seed, got in by_seed.items() if set(got) != paper_only}
        found[context] = (members, by_seed)
    return found


def progress(claim: Claim, runs: list[RunRecord]) -> list[str]:
    """How far a design without a complete replicate has got: its finished points, per context and seed."""
    design = claim.design()
    found = []
    for members, by_seed in _replicates(design, [r for r in runs if r.arch == claim.arch]).values():
        found += [f"{section_of(members[0][0])}, seed {seed}: {len(got)} of {design.runs} design points "
                  "finished" for seed, got in sorted(by_seed.items())]  # fmt: skip
    return found


def _reported(factor: str, metric: str) -> tuple[float | None, int, str]:
    """The paper's delta for the switch an arm flips, with its direction and claim title."""
    for claim in load_claims():
        if claim.kind == "delta" and claim.arm == factor:
            for m in claim.measures:
                if m.metric == metric:
                    return m.reported, claim.direction, claim.title
            return None, claim.direction, claim.title
    return None, -1, factor


def rows(claim: Claim, runs: list[RunRecord], settings: Settings) -> list[Row]:
    design = claim.design()
    found: list[Row] = []
    for context, (members, by_seed) in _replicates(design, runs).items():
        complete = sorted(s for s, got in by_seed.items() if len(got) == design.runs)
        if not complete:
            continue
        ordered = [by_seed[s][design.signs(i)] for s in complete for i in range(design.runs)]
        text = section_of(ordered[0]) + f", design {claim.sweep}"
        lost = [r for r, _ in members if not r.finished]
        partial = sorted(set(by_seed) - set(complete))
        for measure in claim.measures:
            effects = _effects(claim, design, measure.metric, complete, ordered, context, text)
            for row in effects:
                row.not_finished = lost
                row.setting = section_setting(ordered[0])
                if partial:
                    row.notes.append(f"seeds {partial} have only part of the design: not used")
            found += effects
    return found


def _effects(
    claim: Claim,
    design: Design,
    metric: str,
    seeds: list[int],
    ordered: list[RunRecord],
    context: str,
    text: str,
) -> list[Row]:
    y, method = errors(ordered, [metric] * len(ordered))
    k = len(design.factors)
    chains = design.interaction_chains if len(seeds) > 1 else []  # one replicate cannot tell them from noise
    signs_ = np.asarray(design.matrix, dtype=float)
    columns = [signs_[:, j] for j in range(k)] + [signs_[:, c[0][0]] * signs_[:, c[0][1]] for c in chains]
    by_seed = y.reshape(len(seeds), design.runs, -1)  # (seeds, points, images)
    cmd = command(ordered, claim.sweep, seeds)
    out = []
    for j, column in enumerate(columns):
        # the mean at + minus the mean at -, in each replicate and on each image
        theta = np.einsum("p,spi->si", column * 2.0 / design.runs, by_seed)
        est = stats.per_seed(theta)
        est.method = method + (", design" if method else "")
        if j < k:
            reported, direction, title = _reported(design.factors[j], metric)
            label = f"main effect of {design.factors[j]} ({title}), {metric}"
        else:
            reported, direction = None, 0
            label = f"interaction chain {design.chain_name(chains[j - k])}, {metric}"
        row = Row(
            claim=claim, label=label, section=text, context=context, estimate=est, reported=reported,
            direction=direction, unit="pp", runs=ordered, command=cmd,
            metric=metric, primary=j < k and metric == claim.primary,
            per_seed={s: float(theta[i].mean()) for i, s in enumerate(seeds)},
        )  # fmt: skip
        if j < k:
            row.notes.append(
                "a main effect: averaged over the other switches' levels, not at the paper's config"
            )
            if len(seeds) == 1:
                row.notes.append(
                    "one replicate: an effect's interval comes from the spread of its replicates, so it "
                    "needs a second seed of the design (and as many as the minimum seeds for a verdict)"
                )
        out.append(row)
    if method == "seeds only":
        for row in out:
            row.notes.append(
                "no per-image test outcomes in these runs: the interval holds the runs' noise only"
            )
    return out if not math.isnan(out[0].estimate.mean) else []
