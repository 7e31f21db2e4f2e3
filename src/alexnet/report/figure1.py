"""Figure 1's claim: ReLU reaches 25% training error about six times sooner than tanh, each net at the
learning rate that trains it fastest.

Each arm's learning rate (``claim.tune``) is chosen on the runs of the claim's ``selection_seeds`` and the
ratio is measured on the other seeds, so that the choice does not flatter the runs it reports. A run that
never reached the target counts as its ``trainer.max_epochs`` (censored), and so does a run that failed or
diverged at that rate: a rate where some seeds blew up cannot win on its survivors. With a censored tanh run
the ratio is a lower bound; with a censored ReLU run there is no verdict.

The sweep runs the selection seeds on the whole grid; once they have ended, the report names each arm's
second stage, its ``reported_seeds`` at its chosen rate only (18 runs for 3 rates, 2 + 3 seeds, 2 arms,
where the whole grid at every seed would be 30, most of the extra at tanh's slow rates).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from alexnet.report import stats
from alexnet.report.claims import PAPER_ARM, Claim, Measure
from alexnet.report.rows import Row
from alexnet.report.runs import RunRecord, command


@dataclass
class Curves:
    """Training error per epoch of each arm's reported runs at its chosen rate, for the plot."""

    context: str
    curves: dict[str, list[list[tuple[int, float]]]]
    target: float


def epochs_to_target(run: RunRecord) -> tuple[float, bool]:
    """Epochs to the target training error, and whether it is censored (never reached, or no result)."""
    if run.finished and "final/epochs_to_target" in run.metrics:
        return run.metrics["final/epochs_to_target"], False
    return float(run.params.get("trainer.max_epochs", "nan")), True


def _latest(runs: list[RunRecord]) -> dict[int, RunRecord]:
    """One run per seed, finished or not: the newest (runs come oldest first)."""
    return {r.seed: r for r in runs if r.seed is not None}


def _settings(claim: Claim, runs: list[RunRecord]) -> dict[tuple[str, ...], list[RunRecord]]:
    """The runs at each setting of ``claim.tune``."""
    settings: dict[tuple[str, ...], list[RunRecord]] = defaultdict(list)
    for r in runs:
        settings[tuple(r.params.get(k, "-") for k in claim.tune)].append(r)
    return settings


def choose(claim: Claim, runs: list[RunRecord]) -> tuple[tuple[str, ...] | None, list[RunRecord], str]:
    """(the fastest setting of ``claim.tune`` on the selection seeds, the reported runs at it, a note)."""
    settings = _settings(claim, runs)
    selection = set(claim.selection_seeds)
    held_out = any(r.seed in selection for r in runs)

    def speed(setting: tuple[str, ...]) -> tuple[float, float]:
        chosen = [r for s, r in _latest(settings[setting]).items() if not held_out or s in selection]
        if not chosen:
            return math.inf, math.inf
        epochs = [epochs_to_target(r)[0] for r in chosen]
        final = [r.metrics.get("final/train_top1_err", 1.0) for r in chosen]
        return float(np.mean(epochs)), float(np.mean(final))

    if not settings:
        return None, [], ""
    ranked = sorted(settings, key=speed)
    best = ranked[0]
    reported = [r for s, r in _latest(settings[best]).items() if not held_out or s not in selection]
    tried = "; ".join(f"{','.join(s)}: {speed(s)[0]:.1f}" for s in ranked)
    how = "on the selection seeds" if held_out else "on the reported runs themselves (optimistic)"
    note = f"best {'/'.join(claim.tune)} = {','.join(best)} chosen {how} (mean epochs: {tried})"
    return best, reported, note


def _selection_ended(claim: Claim, settings: dict[tuple[str, ...], list[RunRecord]]) -> bool:
    """Every selection seed has ended at every setting: before that the choice may still change."""
    selection = set(claim.selection_seeds)

    def ended(group: list[RunRecord]) -> bool:
        latest = _latest(group)
        return all(s in latest and latest[s].status not in ("RUNNING", "SCHEDULED") for s in selection)

    return bool(selection) and all(map(ended, settings.values()))


def beyond_the_grid(claim: Claim, arm: str, runs: list[RunRecord]) -> str | None:
    """A note when the chosen value of the first tuned key is the grid's smallest or largest, with the
    first-stage command one grid step past it: the fastest rate may lie outside the grid, and section 3.1's
    "as fast as possible" is not established until a rate on each side of the chosen one is slower."""
    best, _, _ = choose(claim, runs)
    settings = _settings(claim, runs)
    if best is None or not _selection_ended(claim, settings):
        return None
    try:
        grid = sorted({float(s[0]) for s in settings})
        chosen = float(best[0])
    except ValueError:  # not numeric: no order, no edge
        return None
    if len(grid) < 2 or not (chosen == grid[0] or chosen == grid[-1]):
        return None
    step = grid[1] / grid[0] if chosen == grid[0] else grid[-1] / grid[-2]
    past = chosen / step if chosen == grid[0] else chosen * step
    first = [r for r in runs if r.seed in claim.selection_seeds] or runs
    then = command(first, claim.sweep, claim.selection_seeds, {"arm": arm, claim.tune[0]: f"{past:.2g}"})
    side = "smallest" if chosen == grid[0] else "largest"
    return f"{arm}: {claim.tune[0]}={best[0]} is the grid's {side}; try one step past it first: `{then}`"


def second_stage(claim: Claim, arm: str, runs: list[RunRecord]) -> str | None:
    """A note with the multirun of the reported seeds at ``arm``'s chosen setting, once every selection seed
    has ended at every setting (before that the choice may still change); None before that."""
    best, reported, _ = choose(claim, runs)
    settings = _settings(claim, runs)
    if best is None or not _selection_ended(claim, settings):
        return None
    selection = set(claim.selection_seeds)
    done = {r.seed for r in reported}
    missing = [s for s in claim.reported_seeds if s not in done]
    fixed = {"arm": arm, **{k: v for k, v in zip(claim.tune, best, strict=True) if v != "-"}}
    then = command(settings[best], claim.sweep, sorted(done | set(claim.reported_seeds)), fixed)
    still = f" (still to run: seed {', '.join(map(str, missing))})" if missing else ""
    note = f"{arm}: the reported seeds at its chosen rate{still}: `{then}`"
    capped = sorted(
        s for s, r in _latest(settings[best]).items() if s in selection and epochs_to_target(r)[1]
    )
    if capped:  # the protocol wants no run stopped at the cap: say so before the second stage is run
        note += (f"; but at that rate selection seed {', '.join(map(str, capped))} never reached the target: "
                 "rerun both stages with a larger trainer.max_epochs (or another grid), or the ratio is only "
                 "a bound")  # fmt: skip
    return note


def ratio_row(
    claim: Claim, measure: Measure, context: str, text: str, a: list[RunRecord], b: list[RunRecord]
) -> tuple[Row, Curves | None]:  # fmt: skip
    notes, chosen = [], {}
    for name, runs in ((PAPER_ARM, a), (claim.arm, b)):
        _, reported, note = choose(claim, runs)
        chosen[name] = {r.seed: r for r in reported}
        notes.append(f"{name}: {note}")
        if edge := beyond_the_grid(claim, name, runs):
            notes.append(edge)
        if then := second_stage(claim, name, runs):
            notes.append(then)
    ea = {s: epochs_to_target(r) for s, r in chosen[PAPER_ARM].items()}
    eb = {s: epochs_to_target(r) for s, r in chosen[claim.arm].items()}
    seeds = sorted(ea.keys() & eb.keys())
    per_seed = {s: eb[s][0] / ea[s][0] for s in seeds}
    est = stats.log_ratio_estimate(list(per_seed.values()))
    undecidable = None
    if any(eb[s][1] for s in seeds):
        notes.append(f"{claim.arm} did not reach the target in every run: the ratio is a lower bound")
    if any(ea[s][1] for s in seeds):
        undecidable = f"{PAPER_ARM} did not reach the target in every run: not comparable"
        notes.append(undecidable)
    used = [chosen[PAPER_ARM][s] for s in seeds] + [chosen[claim.arm][s] for s in seeds]
    first = [r for r in a + b if r.seed in claim.selection_seeds] or a + b  # the sweep: the first stage
    row = Row(
        claim=claim, label=measure.label or measure.metric, section=text, context=context, estimate=est,
        reported=measure.reported, direction=claim.direction, unit="x", runs=used, per_seed=per_seed,
        command=command(first, claim.sweep, sorted({r.seed for r in first if r.seed is not None})),
        notes=notes, undecidable=undecidable,
    )  # fmt: skip
    if not seeds:
        return row, None
    target = float(chosen[PAPER_ARM][seeds[0]].params.get("target_train_error", "0.25"))
    curves = {
        _label(name, chosen[name][seeds[0]], claim.tune): [_curve(chosen[name][s]) for s in seeds]
        for name in (PAPER_ARM, claim.arm)
    }
    return row, Curves(context, curves, target)


def _label(arm: str, run: RunRecord, tune: tuple[str, ...]) -> str:
    setting = ", ".join(f"{k.split('.')[-1]} {run.params.get(k, '-')}" for k in tune[:1])
    return f"{arm} arm: {run.params.get('model.activation', '?')}, {setting}"


def _curve(run: RunRecord) -> list[tuple[int, float]]:
    # train/top1_err is logged once per epoch (run.history keeps it in step order); its position is the
    # epoch. The curve starts at chance error at epoch 0, as the time-to-target interpolation does.
    chance = 1.0 - 1.0 / int(run.params.get("model.num_classes", "10"))
    return [(0, chance)] + [(i + 1, value) for i, value in enumerate(run.history.get("train/top1_err", []))]
