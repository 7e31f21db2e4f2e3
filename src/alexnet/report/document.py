"""The report's content: its rules, one table of verdicts and one of noise and power per context, the
claims without runs, the runs that did not finish, and the per-seed values."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from datetime import datetime, timezone

import numpy as np

from alexnet.report import factorial, stats
from alexnet.report.claims import Claim, own_preset
from alexnet.report.render import Bullets, Document, Image, Section, Table
from alexnet.report.rows import Row, Settings
from alexnet.report.runs import RunRecord, common_overrides

METHOD = (
    "**Intervals.** Each effect is estimated from every test image of every run: the runs (arms, seeds, "
    "design points) are fitted image by image with the seeds as blocks, and the variance of the effect is "
    "split into the part that comes from the seeds and the part that comes from the finite test set (the "
    "method of moments for crossed random effects; docs/statistics.md). The 95% interval is a t interval "
    "with the runs' degrees of freedom (seeds - 1 for a delta or a factorial effect). Why not a bootstrap "
    "over seeds and images: with 3 to 8 seeds a "
    "bootstrap has too few distinct resamples and its intervals are too narrow, while the t quantile with "
    "few degrees of freedom is exactly the correction they lack. Arms are compared on the same images and, "
    "within a seed, with the same data order, augmentation draws and initial weights (common random "
    "numbers), so their noise largely cancels; the noise table shows the correlation this bought. A delta "
    "is the paper's arm minus the ablated arm in points of error (negative: the paper's choice is better); "
    "a ratio is a geometric mean of per-seed ratios."
)


def header(settings: Settings) -> list:
    rules = [f"*{name}*: {rule}" for name, rule in stats.VERDICTS.items()]
    return [
        METHOD,
        "**Verdicts**, from the 95% interval (equivalently, from two-sided tests at 5%):",
        Bullets(rules),
        f"The margin for *no effect* is ±{settings.margin} points of error (a ratio within "
        f"[1/{settings.ratio_margin}, {settings.ratio_margin}]). A verdict other than *inconclusive* needs "
        f"at least {settings.min_seeds} seeds (`--min-seeds`); in a factorial design, as many replicates, "
        "since each effect's noise is measured from its own replicates. **Holm** is the same rule applied "
        "to p-values corrected with Holm's step-down method within a family declared before the data: a "
        "section's *primary* rows (each claim's primary metric, `primary:` in conf/claims.yaml) are one "
        "family, its *secondary* rows (other metrics, interaction chains) another. All three tests of every "
        "row of a family (against no effect, against the paper's number, of equivalence) are corrected "
        "together, so the chance that any corrected verdict of a family is wrong stays at 5%, whichever "
        "test gave it; runs of another protocol are another section and never change these verdicts.",
        "**Power.** *MDE*: the smallest true effect this row would call non-zero with 80% power at its "
        "current seeds (the noncentral t). *Seeds for 80%*: the seeds (never fewer than the minimum) that "
        "would give 80% power to detect the paper's number, from the noise measured so far (the seeds' part "
        "shrinks with more seeds; the test set's part does not, so some effects cannot be reached by seeds "
        "alone: `-`). *After Holm*: the same at the family's Bonferroni level (5% over its number of "
        "tests), which Holm's correction never asks more than, so those seeds give the corrected verdict "
        "80% power too, at the family's size today. *Training for that*: the runs those "
        "seeds take in all (both arms), and their time at the median wall time of this row's finished runs "
        "(MLflow's start to end: it includes time a run shared the machine, or waited to be resumed). Add "
        "seeds with `seed=4,5,...`: finished runs are skipped, only the new seeds train.",
    ]


def _value(row: Row, value: float, signed: bool = True) -> str:
    if not math.isfinite(value):
        return "-"
    if row.unit == "x":
        return f"{math.exp(value):.2f}x"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _ours(row: Row) -> str:
    e = row.estimate
    if e.n == 0:
        return "no runs to compare"
    if not e.ok:
        return f"{_value(row, e.mean)} (n={e.n}, no interval)"
    return f"{_value(row, e.mean)} [{_value(row, e.low)}, {_value(row, e.high)}]"


def _paper(row: Row) -> str:
    if row.reported is None:
        if row.direction == 0:
            return "-"
        return "no number (" + ("lower error" if row.direction < 0 else "above 1") + ")"
    return f"{row.reported:+.1f}" if row.unit == "pp" else f"~{row.reported:g}x"


def _n(row: Row) -> str:
    lost = f" (+{len(row.not_finished)} not finished)" if row.not_finished else ""
    return f"{row.estimate.n}{lost}"


def primary_table(rows: list[Row]) -> Table:
    """Every section's primary rows, as the README copies them (``report.py --readme``)."""
    names = list(sections(rows))
    several = len(names) > 1
    scale = {n: n.partition(" (config ")[0] for n in names}
    shared = set.intersection(*(set(scale[n].split(", ")) for n in names)) if names else set()
    short = {n: ", ".join(t for t in scale[n].split(", ") if t not in shared) for n in names}  # what differs
    if len(set(short.values())) < len(names):  # the scales alone do not tell the sections apart
        short = {n: f"{short[n]} (config {n.partition(' (config ')[2]}" for n in names}
    header = ["claim (§)", "seeds", "paper", "ours, mean [95% CI]", "verdict", "after Holm"]
    body = []
    for row in sorted((r for r in rows if r.primary), key=lambda r: names.index(r.section)):
        arm = re.search(r" \((\w+)\)$", row.label)  # a claim of several arms (depth) names the arm
        title = f"{row.claim.title}{f', {arm[1]}' if arm else ''} ({row.claim.section})"
        cells = [title, _n(row), _paper(row), _ours(row)]
        body.append([*([short[row.section]] if several else []), *cells, row.verdict, row.adjusted_verdict])
    return Table([*(["runs with"] if several else []), *header], body)


def verdict_table(rows: list[Row]) -> Table:
    header = [
        "claim",
        "§",
        "metric",
        "family",
        "paper",
        "ours, mean [95% CI]",
        "n",
        "verdict",
        "Holm",
        "MDE",
        "command",
    ]
    body = [
        [
            row.claim.title,
            row.claim.section,
            row.label,
            "primary" if row.primary else "secondary",
            _paper(row),
            _ours(row),
            _n(row),
            f"**{row.verdict}**",
            f"**{row.adjusted_verdict}**",
            _value(row, row.mde, signed=False),
            f"`{row.command}`",
        ]  # fmt: skip
        for row in rows
    ]
    return Table(header, body)


def noise_table(rows: list[Row]) -> Table:
    header = ["claim", "metric", "method", "seed-to-seed SD", "test-set SE", "arms' correlation r",
              "pairing bought", "seeds for 80%", "seeds for 80% after Holm", "training for that"]  # fmt: skip
    body = []
    for row in rows:
        sd = _seed_sd(row)
        r, gain = row.correlation
        body.append([
            row.claim.title, row.label, row.estimate.method or "-",
            f"{sd:.2f}" if math.isfinite(sd) else "-",
            f"{math.sqrt(row.estimate.image_part):.2f}" if row.estimate.image_part > 0 else "-",
            f"{r:+.2f}" if math.isfinite(r) else "-", f"{gain:.1f}x variance" if math.isfinite(gain) else "-",
            str(row.seeds_needed) if row.seeds_needed else "-",
            str(row.seeds_needed_holm) if row.seeds_needed_holm else "-", _hours_needed(row),
        ])  # fmt: skip
    return Table(header, body)


def _seed_sd(row: Row) -> float:
    """How far one seed's estimate scatters: its per-seed deltas' SD, or for a design, whose replicates give
    no delta each, the runs' part of the variance scaled to one replicate."""
    if row.unit != "pp":
        return math.nan
    if len(row.per_seed) > 1:
        return float(np.std(list(row.per_seed.values()), ddof=1))
    if not row.per_seed and row.estimate.ok and math.isfinite(row.estimate.run_part):
        return math.sqrt(row.estimate.run_part * row.estimate.n)
    return math.nan


def _hours_needed(row: Row) -> str:
    """The training that the seeds for 80% after Holm would take in all: its runs per seed (two arms, or one
    for a comparison within the same runs) at the median wall time of this row's finished runs."""
    times = [(r.end - r.start) / 3_600_000 for r in row.runs if r.finished and r.end]
    if not row.seeds_needed_holm or not times or not row.estimate.n:
        return "-"
    runs = row.seeds_needed_holm * len(row.runs) / row.estimate.n
    hours = runs * float(np.median(times))
    return f"{runs:.0f} runs, " + (f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min")


def provenance(runs: list[RunRecord], made_by: dict[str, str]) -> list:
    """Where the numbers come from: the runs (their code, their dates, their time) and this report."""
    day = lambda ms: datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
    span = lambda rs: f"{day(min(r.start for r in rs))} to {day(max(r.end or r.start for r in rs))} UTC"  # noqa: E731
    by_commit: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        tag = r.tags.get("git_commit", "unknown")
        by_commit[tag[:12] + ("-dirty" if tag.endswith("-dirty") else "")].append(r)
    finished = [r for r in runs if r.finished and r.end]
    hours = sum((r.end - r.start) for r in finished) / 3_600_000
    made = f"{len(runs)} training runs ({len(finished)} finished), made {span(runs)}"
    code = "by commit(s) " + ", ".join(f"`{c}`" for c in sorted(by_commit))
    time = f"{hours:.1f} hours of training in all (their MLflow start and end times)"
    each = [f"commit `{c}`: {len(rs)} runs, {span(rs)}" for c, rs in sorted(by_commit.items())]
    lines = [f"{made} {code}; {time}", *(each if len(each) > 1 else [])]
    return [Bullets([*lines, *(f"{key}: {value}" for key, value in made_by.items())])]


def build(
    title: str, claims: list[Claim], rows: list[Row], runs: list[RunRecord], plots: dict[str, list[str]],
    settings: Settings, made_by: dict[str, str] | None = None,
) -> Document:  # fmt: skip
    doc = Document(title, [Section("Where these numbers come from", provenance(runs, made_by or {}))])
    doc.sections.append(Section("How to read this report", header(settings)))
    if not rows:
        doc.sections.append(
            Section("No claim could be evaluated", ["No context holds runs of both arms of any claim."])
        )
    for text, group in sections(rows).items():
        blocks = [verdict_table(group), "Noise and power:", noise_table(group)]
        notes = list(dict.fromkeys(f"{row.claim.title}: {note}" for row in group for note in row.notes))
        if notes:
            blocks += ["Notes:", Bullets(notes)]
        blocks += [Image(file, f"{text} {file}") for file in plots.get(text, [])]
        doc.sections.append(Section(f"Runs with {text}", blocks))
    missing = [c for c in claims if not any(r.claim.name == c.name for r in rows)]
    if missing:
        base = common_overrides(_main_scale(rows) or runs)
        items = [f"{c.title} (section {c.section}): `{missing_command(c, base)}`" for c in missing]
        items += [
            f"{c.title}: {p}" for c in missing if c.kind == "factorial" for p in factorial.progress(c, runs)
        ]
        doc.sections.append(Section("Claims without runs in this experiment, and the commands that add them",
                                    [Bullets(items)]))  # fmt: skip
    lost = sorted((r for r in runs if not r.finished), key=lambda r: (r.arm or "", r.seed or 0))
    if lost:
        table = Table(["run", "arm", "seed", "status", "why"], [
            [f"{r.name} (`{r.run_id}`)", r.arm or "-", str(r.seed), r.status, r.why_not_finished()[:200]]
            for r in lost
        ])  # fmt: skip
        doc.sections.append(Section("Runs that did not finish", [table]))
    else:
        doc.sections.append(Section("Runs that did not finish", ["None: every run finished."]))
    per_seed = [
        f"{row.claim.title}, {row.label} ({row.section}): "
        + ", ".join(_seed_value(row, s, v) for s, v in row.per_seed.items())
        for row in rows
        if row.per_seed
    ]
    if per_seed:
        intro = "Each seed's effect; for a difference, in brackets the two errors (points) it subtracts."
        doc.sections.append(Section("Per-seed values", [intro, Bullets(per_seed)]))
    return doc


def _seed_value(row: Row, seed: int, value: float) -> str:
    if row.unit != "pp":
        return f"seed {seed}: {value:.2f}x"
    both = row.compared.get(seed)
    return f"seed {seed}: {value:+.2f}" + (f" ({both[0]:.2f} - {both[1]:.2f})" if both else "")


def _main_scale(rows: list[Row]) -> list[RunRecord]:
    """The runs of the section that decides the most claims: a missing claim's command is at its scale, not
    at a regime made for a few claims (experiment=cpu_overfit beside cpu)."""
    if not rows:
        return []
    group = max(sections(rows).values(), key=lambda g: len({r.claim.name for r in g}))
    return list({run.run_id: run for row in group for run in row.runs}.values())


def sections(rows: list[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        grouped[row.section].append(row)
    return dict(grouped)


def missing_command(claim: Claim, base: str) -> str:
    """The command that would add ``claim`` to this report: at the scale and on the data of its other runs,
    or at the preset made for this claim at that scale (``experiment=cpu_figure1`` beside ``cpu``)."""
    base = " ".join(_claim_scale(o, claim) for o in base.split())
    if claim.sweep:  # the sweep file names its arms and seeds
        return " ".join(p for p in ("python src/train.py -m", f"+ablation={claim.sweep}", base) if p)
    arms = ",".join(("paper", *claim.arms))
    return " ".join(p for p in ("python src/train.py -m", f"arm={arms}", base, "seed=1,2,3") if p)


def _claim_scale(override: str, claim: Claim) -> str:
    key, _, value = override.partition("=")
    return f"{key}={own_preset(claim.sweep, value)}" if key == "experiment" else override
