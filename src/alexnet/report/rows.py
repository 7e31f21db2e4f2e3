"""A row of the report: one effect of one claim in one section, its estimate, and its verdicts.

``judge`` gives every row its p-values, its verdict before and after Holm's correction, its minimum
detectable effect and the seeds it would need. The correction runs within a family declared before the
data: a section's primary rows (each claim's ``primary`` metric in conf/claims.yaml), or its secondary rows
(other metrics, interaction chains). Runs of another protocol are another section, so they never change a
primary verdict.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from alexnet.report import stats
from alexnet.report.claims import Claim, all_arm_keys
from alexnet.report.runs import RunRecord, describe, digest, setting_of


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
    seeds_needed_holm: int | None = None  # the same at the family's Bonferroni level: enough for Holm too
    undecidable: str | None = None  # why no verdict can be given, whatever the interval (a censored baseline)
    metric: str = ""  # the metric measured (the factorial's and Figure 1's too)
    primary: bool = False  # the claim's declared primary metric (conf/claims.yaml), not an interaction chain

    @property
    def key(self) -> str:
        """A name for MLflow: the claim, the measure and the context."""
        label = re.sub(r"[^A-Za-z0-9_-]+", "_", self.label).strip("_")
        return f"{self.claim.name}.{label}.{self.context}"

    @property
    def family(self) -> tuple[str, str]:
        """The rows Holm's correction runs over together: one section's primary rows, or its others."""
        return self.section, "primary" if self.primary else "secondary"


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


def judge(rows: list[Row], settings: Settings) -> None:
    """p-values, Holm's correction within each family (``Row.family``), verdicts, power."""
    for row in rows:
        reported, margin = _scaled(row, settings)
        row.test = stats.test(row.estimate, reported, margin)
        row.mde = stats.mde(row.estimate)
        row.seeds_needed = stats.seeds_needed(row.estimate, reported, least=settings.min_seeds)
        if row.estimate.degenerate:
            row.notes.append(
                "both sides gave the same result in every seed (and on every test image): no noise to "
                "measure, so no interval and no verdict"
            )
    families: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        families[row.family].append(row)
    for family in families.values():
        stats.adjust([row.test for row in family])
        # Holm's first threshold is ALPHA / m, and it rejects whatever Bonferroni at that level rejects, so
        # 80% power there is at least 80% power after the correction (m: the family's tests so far).
        tests = sum(math.isfinite(getattr(row.test, h)) for row in family for h in stats.HYPOTHESES)
        for row in family:
            reported, _ = _scaled(row, settings)
            row.seeds_needed_holm = stats.seeds_needed(
                row.estimate, reported, least=settings.min_seeds, alpha=stats.ALPHA / max(tests, 1)
            )
    for row in rows:
        reported, _ = _scaled(row, settings)
        raw = {k: getattr(row.test, k) for k in stats.HYPOTHESES}
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


def _scaled(row: Row, settings: Settings) -> tuple[float | None, float]:
    """The paper's number and the margin in the estimate's units (a ratio's estimate is its log)."""
    if row.unit == "x":
        return (None if row.reported is None else math.log(row.reported)), math.log(settings.ratio_margin)
    return row.reported, settings.margin
