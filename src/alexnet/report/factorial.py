"""A fractional factorial claim: every main effect and every two-factor alias chain the design separates,
each main effect beside the paper's delta for its switch.

A run is a point of the design when each factor's switches sit at the paper's level or at its arm's
(alexnet.report.claims.arm_of's test, factor by factor); its seed is its replicate. Only complete
replicates (every point of the design finished for that seed) enter, so the design stays orthogonal. The
model, fitted image by image: a block per seed, the main effects, one column per alias chain. An effect is
the mean at the paper's level minus the mean at the arm's level, in points of error (negative: the paper's
choice is better), as for a one-switch delta.

One replicate of a 16-run design fitted that way leaves one degree of freedom for the runs' noise: no
interval. So with one replicate the chains are pooled into the error, as is usual for an unreplicated
screening design, which leaves 8. In a resolution IV design no chain is aliased with a main effect, so the
main effects lose no accuracy; a real interaction widens their intervals (the error errs on the safe side).
A second seed separates the chains again.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from alexnet.design import Design
from alexnet.report import stats
from alexnet.report.analysis import Row, Settings, errors, section_of, section_setting
from alexnet.report.claims import PAPER_ARM, Claim, level_of, load_arm, load_claims
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
    chains = design.interaction_chains if len(seeds) > 1 else []  # one replicate: pooled (the docstring)
    blocks = np.kron(np.eye(len(seeds)), np.ones((design.runs, 1)))
    mains = np.tile(design.matrix, (len(seeds), 1)).astype(float)
    pairs = [mains[:, [c[0][0]]] * mains[:, [c[0][1]]] for c in chains]  # one column per chain
    x = np.hstack([blocks, mains, *pairs])
    base = len(seeds)
    cmd = command(ordered, claim.sweep, seeds)
    out = []
    for j in range(k + len(chains)):
        contrast = np.zeros(x.shape[1])
        contrast[base + j] = 2.0  # an effect: the mean at + minus the mean at -
        est = stats.crossed(y, x, contrast, seeds=len(seeds))
        est.method = method + (", design" if method else "")
        if j < k:
            reported, direction, title = _reported(design.factors[j], metric)
            label = f"main effect of {design.factors[j]} ({title}), {metric}"
        else:
            reported, direction, label = (
                None,
                0,
                f"interaction chain {design.chain_name(chains[j - k])}, {metric}",
            )
        row = Row(
            claim=claim, label=label, section=text, context=context, estimate=est, reported=reported,
            direction=direction, unit="pp", runs=ordered, command=cmd,
        )  # fmt: skip
        if j < k:
            row.notes.append(
                "a main effect: averaged over the other switches' levels, not at the paper's config"
            )
            if not chains:
                row.notes.append(
                    f"one replicate: the {len(design.interaction_chains)} interaction chains are pooled into "
                    "the error (their effects widen this interval if real); a second seed estimates them"
                )
        out.append(row)
    if method == "seeds only":
        for row in out:
            row.notes.append(
                "no per-image test outcomes in these runs: the interval holds the runs' noise only"
            )
    return out if not math.isnan(out[0].estimate.mean) else []
