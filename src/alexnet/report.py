"""The measured-vs-reported report: the ablation runs read back from MLflow, claim by claim.

For every claim in ``conf/claims.yaml`` and every *context* (a set of runs that differ only in the claim's own
switches and the seed), the report gives the paper's number, our mean effect with a 95% confidence interval
over seeds, n, and a verdict:

- **reproduced**: the interval lies entirely on the paper's side of no effect (0 for a delta, 1 for a ratio);
- **opposite**: it lies entirely on the other side;
- **inconclusive**: it contains no effect, or fewer than 2 seeds could be compared.

Whether the paper's own value lies inside our interval is a separate column ("size"): a run 100x smaller than
the paper's can confirm a direction and still not the size. Runs that did not finish (failed, diverged,
killed, still running) are listed, and each row says how many of its runs are missing.

Contexts: two runs are compared only if every logged parameter agrees except the seed, the ablation tags, the
keys the claim's arm flips (``conf/arm/<arm>.yaml``) and the keys it tunes; so runs of different data sets,
network sizes, schedules or learning rates are never mixed in one comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from omegaconf import OmegaConf
from scipy import stats

from alexnet.tracking import flatten

ROOT = Path(__file__).resolve().parents[2]
CLAIMS_FILE = ROOT / "conf" / "claims.yaml"
ARMS_DIR = ROOT / "conf" / "arm"
PAPER_ARM = "paper"
REPORT_TAG = "alexnet.report"

# Parameters that say where a run's files went or how it was shown, not what it measured (as in
# tracking.run_key, plus the data folder, which differs between machines that share a tracking server).
_NOT_CONTEXT_PREFIXES = ("paths.", "logger.", "hydra.", "optuna.", "ablation.")
_NOT_CONTEXT_KEYS = {
    "seed",
    "resume",
    "optuna",
    "data.root",
    "data.cache_dir",
    "data.num_workers",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
}
# The config's own top-level values. Other undotted params are the LightningModule's hyper-parameters, which
# Lightning logs once training starts: copies of optimizer.* that a run that failed earlier does not have.
_TOP_LEVEL_KEYS = {"task_name", "target_train_error", "stop_at_target", "test_after_fit"}
# What a reader needs to tell contexts apart at a glance (the full parameter set decides).
_CONTEXT_SUMMARY = (
    "model.arch",
    "data.dataset",
    "model.input_size",
    "model.width",
    "data.train_size",
    "trainer.max_epochs",
)


class ReportError(RuntimeError):
    """The report cannot be made: the message says what is missing and what to run."""


# ---------------------------------------------------------------------------------------------------------
# The claims


@dataclass(frozen=True)
class Measure:
    metric: str
    reported: float | None
    baseline_metric: str | None = None  # kind "views": the metric it is compared with in the same run
    label: str | None = None


@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    section: str
    paper_data: str
    kind: str  # delta | views | ratio
    direction: int
    measures: tuple[Measure, ...]
    arm: str | None = None
    arch: str = "alexnet"
    tune: tuple[str, ...] = ()
    sweep: str = ""  # the conf/ablation/ sweep that runs it; default: the claim's name

    @property
    def command(self) -> str:
        return f"python src/train.py -m +ablation={self.sweep or self.name}"


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    claims = []
    for name, c in data["claims"].items():
        if c["kind"] not in ("delta", "views", "ratio"):
            raise ReportError(f"{path}: claims.{name}.kind={c['kind']!r}; use delta, views or ratio")
        if c["kind"] != "views" and not (ARMS_DIR / f"{c.get('arm')}.yaml").is_file():
            raise ReportError(f"{path}: claims.{name}.arm={c.get('arm')!r} is not a file in {ARMS_DIR}")
        measures = tuple(Measure(**m) for m in c.pop("measures"))
        claims.append(Claim(name=name, measures=measures, **{**c, "tune": tuple(c.get("tune", ()))}))
    return claims


@dataclass(frozen=True)
class Arm:
    name: str
    factor: str
    level: str
    keys: frozenset[str]  # the config keys the arm sets, besides its tags


def load_arm(name: str) -> Arm:
    values = flatten(OmegaConf.load(ARMS_DIR / f"{name}.yaml"))
    return Arm(
        name=name,
        factor=str(values["ablation.factor"]),
        level=str(values["ablation.level"]),
        keys=frozenset(k for k in values if not k.startswith("ablation.")),
    )


# ---------------------------------------------------------------------------------------------------------
# The runs


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    factor: str
    level: str
    seed: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def arch(self) -> str:
        return self.params.get("model.arch", "alexnet")  # runs from before the switch existed

    def why_not_finished(self) -> str:
        if self.tags.get("diverged") == "true":
            return "diverged: " + self.tags.get("error", "")
        return self.tags.get("error", "still running, or killed before it could record why")


def _record(run: Run) -> RunRecord:
    tags = run.data.tags
    seed = tags.get("seed", run.data.params.get("seed"))
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        factor=tags["ablation.factor"],
        level=tags.get("ablation.level", ""),
        seed=int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(tags),
    )


def fetch_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[RunRecord]:
    """Every run of the experiment tagged by an ablation arm, whatever its status."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs += [
            _record(r) for r in page if "ablation.factor" in r.data.tags and REPORT_TAG not in r.data.tags
        ]
        token = page.token
        if not token:
            return runs


def context_of(run: RunRecord, ignore: Iterable[str]) -> str:
    ignore = set(ignore) | _NOT_CONTEXT_KEYS
    values = {
        k: v
        for k, v in run.params.items()
        if ("." in k or k in _TOP_LEVEL_KEYS) and k not in ignore and not k.startswith(_NOT_CONTEXT_PREFIXES)
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def describe(run: RunRecord) -> str:
    return ", ".join(f"{k.split('.')[-1]}={run.params.get(k, '-')}" for k in _CONTEXT_SUMMARY)


def all_arm_keys() -> frozenset[str]:
    return frozenset().union(*(load_arm(p.stem).keys for p in ARMS_DIR.glob("*.yaml")))


def section_of(paper_run: RunRecord, claim: Claim) -> str:
    """The report's section for a comparison: its scale, plus the paper arm's config with every switch an
    arm flips left out, so that the claims measured against the same paper runs share one table."""
    return f"{describe(paper_run)} (config {context_of(paper_run, all_arm_keys() | set(claim.tune))})"


# ---------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Estimate:
    """A mean over seeds with its two-sided 95% t interval (nan bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def verdict(est: Estimate, direction: int, null: float = 0.0) -> str:
    """See the module docstring: the interval against no effect, on the side the paper claims."""
    if est.n < 2 or math.isnan(est.low):
        return "inconclusive"
    if (direction < 0 and est.high < null) or (direction > 0 and est.low > null):
        return "reproduced"
    if (direction < 0 and est.low > null) or (direction > 0 and est.high < null):
        return "opposite"
    return "inconclusive"


def size_consistent(est: Estimate, reported: float | None) -> str:
    if reported is None or est.n < 2 or math.isnan(est.low):
        return "-"
    return "yes" if est.low <= reported <= est.high else "no"


# ---------------------------------------------------------------------------------------------------------
# Analysis


@dataclass
class Row:
    claim: Claim
    measure: Measure
    context: str
    section: str
    estimate: Estimate
    verdict: str
    size: str
    unit: str  # "pp" or "x"
    arms: dict[str, int]  # finished runs per arm that entered the estimate
    not_finished: list[RunRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_seed: dict[int, float] = field(default_factory=dict)


@dataclass
class Figure1Curves:
    """Training error per epoch of each arm's runs at its best learning rate, for the Figure 1 plot."""

    context: str
    curves: dict[str, list[list[tuple[int, float]]]]
    target: float


def _by_context(runs: list[RunRecord], ignore: Iterable[str]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[context_of(run, ignore)].append(run)
    return groups


def _by_seed(runs: list[RunRecord], metric: str) -> dict[int, float]:
    """One value per seed (the latest run when a seed was run twice with resume=never)."""
    values = {}
    for run in reversed(runs):  # fetch_runs gives MLflow's order, newest first: let the newest win
        if run.finished and metric in run.metrics and run.seed is not None:
            values[run.seed] = run.metrics[metric]
    return values


def _paired(a: dict[int, float], b: dict[int, float], scale: float) -> dict[int, float]:
    return {s: scale * (a[s] - b[s]) for s in sorted(a.keys() & b.keys())}


def _epochs_to_target(run: RunRecord) -> tuple[float, bool]:
    """Epochs to the target training error; a run that never got there counts as its max_epochs (censored)."""
    if "final/epochs_to_target" in run.metrics:
        return run.metrics["final/epochs_to_target"], False
    return float(run.params.get("trainer.max_epochs", "nan")), True


def analyse(
    claims: list[Claim], runs: list[RunRecord], client: MlflowClient | None = None
) -> tuple[list[Row], list[Figure1Curves]]:
    rows: list[Row] = []
    curves: list[Figure1Curves] = []
    for claim in claims:
        arm = load_arm(claim.arm) if claim.arm else None
        ignore = (arm.keys if arm else frozenset()) | set(claim.tune)
        mine = [r for r in runs if r.arch == claim.arch]
        paper = [r for r in mine if r.factor == PAPER_ARM]
        other = [r for r in mine if arm and (r.factor, r.level) == (arm.factor, arm.level)]
        for context, members in sorted(_by_context(paper + other, ignore).items()):
            a = [r for r in members if r.factor == PAPER_ARM]
            b = [r for r in members if r.factor != PAPER_ARM]
            if not a or (claim.kind != "views" and not b):
                continue  # this claim's other arm was not run in this context
            text = section_of(a[0], claim)
            lost = [r for r in members if not r.finished]
            for measure in claim.measures:
                if claim.kind == "ratio":
                    row, fig = _ratio_row(claim, measure, context, text, a, b, client)
                    if fig is not None:
                        curves.append(fig)
                else:
                    row = _delta_row(claim, measure, context, text, a, b)
                row.not_finished = lost
                rows.append(row)
    return rows, curves


def _delta_row(
    claim: Claim, measure: Measure, context: str, text: str, a: list[RunRecord], b: list[RunRecord]
) -> Row:
    if claim.kind == "views":  # the same runs, two metrics
        per_seed = _paired(_by_seed(a, measure.metric), _by_seed(a, measure.baseline_metric), 100.0)
        arms = {PAPER_ARM: len(per_seed)}
    else:
        va, vb = _by_seed(a, measure.metric), _by_seed(b, measure.metric)
        per_seed = _paired(va, vb, 100.0)
        arms = {PAPER_ARM: len(va), claim.arm: len(vb)}
    est = t_interval(list(per_seed.values()))
    notes = []
    unpaired = max(arms.values()) - len(per_seed)
    if unpaired:
        notes.append(f"{unpaired} run(s) without a partner of the same seed in the other arm: not used")
    return Row(
        claim=claim,
        measure=measure,
        context=context,
        section=text,
        estimate=est,
        verdict=verdict(est, claim.direction),
        size=size_consistent(est, measure.reported),
        unit="pp",
        arms=arms,
        notes=notes,
        per_seed=per_seed,
    )


def _ratio_row(
    claim: Claim,
    measure: Measure,
    context: str,
    text: str,
    a: list[RunRecord],
    b: list[RunRecord],
    client: MlflowClient | None,
) -> tuple[Row, Figure1Curves | None]:
    """Figure 1: each arm at its fastest setting of ``claim.tune``, then the per-seed ratio b / a.

    The interval is a t interval of the mean log ratio, exponentiated (a geometric mean ratio). A run that
    never reached the target counts as max_epochs: a ratio with a censored tanh run is a lower bound, one with
    a censored ReLU run cannot be told apart from no effect.
    """
    notes, best_runs = [], {}
    for arm_name, arm_runs in ((PAPER_ARM, a), (claim.arm, b)):
        settings: dict[tuple[str, ...], list[RunRecord]] = defaultdict(list)
        for r in arm_runs:
            if r.finished:
                settings[tuple(r.params.get(k, "-") for k in claim.tune)].append(r)
        if not settings:
            best_runs[arm_name] = []
            continue

        def speed(item: tuple[tuple[str, ...], list[RunRecord]]) -> tuple[float, float]:
            epochs = [_epochs_to_target(r)[0] for r in item[1]]
            final = [r.metrics.get("final/train_top1_err", 1.0) for r in item[1]]
            return float(np.mean(epochs)), float(np.mean(final))

        ranked = sorted(settings.items(), key=speed)
        best, runs = ranked[0]
        best_runs[arm_name] = runs
        tried = "; ".join(f"{','.join(s)}: {speed((s, rs))[0]:.1f}" for s, rs in ranked)
        notes.append(
            f"{arm_name}: best {'/'.join(claim.tune)} = {','.join(best)} (mean epochs per setting: {tried})"
        )
    ea = {r.seed: _epochs_to_target(r) for r in best_runs[PAPER_ARM] if r.seed is not None}
    eb = {r.seed: _epochs_to_target(r) for r in best_runs[claim.arm] if r.seed is not None}
    seeds = sorted(ea.keys() & eb.keys())
    per_seed = {s: eb[s][0] / ea[s][0] for s in seeds}
    logs = t_interval([math.log(v) for v in per_seed.values()])
    est = Estimate(math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high), logs.n)
    if any(eb[s][1] for s in seeds):
        notes.append(f"{claim.arm} did not reach the target in every run: its ratio is a lower bound")
    result = verdict(logs, claim.direction)
    if any(ea[s][1] for s in seeds):
        notes.append(f"{PAPER_ARM} did not reach the target in every run: not comparable")
        result = "inconclusive"
    row = Row(
        claim=claim,
        measure=measure,
        context=context,
        section=text,
        estimate=est,
        verdict=result,
        size=size_consistent(est, measure.reported),
        unit="x",
        arms={PAPER_ARM: len(ea), claim.arm: len(eb)},
        notes=notes,
        per_seed=per_seed,
    )
    fig = None
    if client is not None and seeds:
        target = float(best_runs[PAPER_ARM][0].params.get("target_train_error", "0.25"))
        fig = Figure1Curves(
            context=context,
            curves={
                _curve_label(name, best_runs[name][0], claim.tune): [
                    _curve(client, r) for r in best_runs[name]
                ]
                for name in (PAPER_ARM, claim.arm)
            },
            target=target,
        )
    return row, fig


def _curve_label(arm: str, run: RunRecord, tune: tuple[str, ...]) -> str:
    setting = ", ".join(f"{k.split('.')[-1]} {run.params.get(k, '-')}" for k in tune[:1])
    return f"{arm} arm: {run.params.get('model.activation', '?')}, {setting}"


def _curve(client: MlflowClient, run: RunRecord) -> list[tuple[int, float]]:
    # train/top1_err is logged once per epoch with step = the global step; its position is the epoch. The
    # curve starts at chance error at epoch 0, as the time-to-target interpolation does.
    history = sorted(client.get_metric_history(run.run_id, "train/top1_err"), key=lambda m: m.step)
    chance = 1.0 - 1.0 / int(run.params.get("model.num_classes", "10"))
    return [(0, chance)] + [(i + 1, m.value) for i, m in enumerate(history)]


# ---------------------------------------------------------------------------------------------------------
# Writing it down


VERDICT_RULE = (
    "**Verdict rule.** Each number is our mean effect over seeds with a two-sided 95% t interval; for a "
    "delta, the paper's arm minus the ablated arm in percentage points of error, paired by seed "
    "(negative: the paper's choice is better); for a ratio, the geometric mean of the per-seed ratios. "
    "*reproduced*: the interval lies entirely on the side of no effect (0, or 1 for a ratio) that the paper "
    "claims; *opposite*: entirely on the other side; *inconclusive*: it contains no effect, or fewer than 2 "
    "seeds could be compared. *Size* says whether the paper's own number lies inside our interval (- where "
    "the paper gives none). Runs that did not finish are never dropped silently: each row counts them and "
    "they are listed."
)


def _fmt(row: Row) -> str:
    e = row.estimate
    if e.n == 0:
        return "no runs to compare"
    value = f"{e.mean:+.2f}" if row.unit == "pp" else f"{e.mean:.2f}x"
    if math.isnan(e.low):
        return f"{value} (n=1, no interval)"
    interval = f"[{e.low:+.2f}, {e.high:+.2f}]" if row.unit == "pp" else f"[{e.low:.2f}, {e.high:.2f}]"
    return f"{value} {interval}"


def _paper(row: Row) -> str:
    r = row.measure.reported
    if r is None:
        return "no number (" + ("lower error" if row.claim.direction < 0 else "above 1") + ")"
    return f"{r:+.1f}" if row.unit == "pp" else f"~{r:g}x"


def _metric(row: Row) -> str:
    m = row.measure
    if m.label:
        return m.label
    return f"{m.metric} vs {m.baseline_metric}" if m.baseline_metric else m.metric


def _table(rows: list[Row]) -> list[list[str]]:
    header = ["claim", "§", "paper's data", "metric", "paper", "ours, mean [95% CI]", "n", "verdict", "size"]
    body = [header]
    for row in rows:
        missing = f" (+{len(row.not_finished)} not finished)" if row.not_finished else ""
        body.append(
            [
                row.claim.title,
                row.claim.section,
                row.claim.paper_data,
                _metric(row),
                _paper(row),
                _fmt(row),
                f"{row.estimate.n}{missing}",
                f"**{row.verdict}**",
                row.size,
            ]
        )
    return body


def _contexts(rows: list[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        grouped[row.section].append(row)
    return grouped


def _unfinished(runs: list[RunRecord]) -> list[RunRecord]:
    return sorted((r for r in runs if not r.finished), key=lambda r: (r.factor, r.level, r.seed or 0))


def _not_measured(claims: list[Claim], rows: list[Row]) -> list[Claim]:
    return [c for c in claims if not any(r.claim.name == c.name for r in rows)]


def write_markdown(
    path: Path, title: str, claims: list[Claim], rows: list[Row], runs: list[RunRecord], plots: dict[str, str]
) -> None:
    lines = [f"# {title}", "", VERDICT_RULE, ""]
    if not rows:
        lines += ["No claim could be evaluated: no context holds runs of both arms of any claim.", ""]
    for text, group in _contexts(rows).items():
        lines += [f"## Runs with {text}", ""]
        table = _table(group)
        lines.append("| " + " | ".join(table[0]) + " |")
        lines.append("|" + "---|" * len(table[0]))
        lines += ["| " + " | ".join(cells) + " |" for cells in table[1:]]
        lines.append("")
        notes = [f"- {row.claim.title}: {note}" for row in group for note in row.notes]
        if notes:
            lines += ["Notes:", "", *dict.fromkeys(notes), ""]
        for name, file in plots.items():
            if name.startswith(group[0].section):
                lines += [f"![{name}]({file})", ""]
    missing = _not_measured(claims, rows)
    if missing:
        lines += ["## Claims without runs of both arms in this experiment", ""]
        lines += [f"- {c.title} (section {c.section}): `{c.command}`" for c in missing] + [""]
    lost = _unfinished(runs)
    lines += ["## Runs that did not finish", ""]
    if not lost:
        lines += ["None: every run tagged by an arm finished.", ""]
    else:
        lines += ["| run | factor | level | seed | status | why |", "|---|---|---|---|---|---|"]
        for r in lost:
            why = r.why_not_finished().replace("|", "/").replace("\n", " ")[:200]
            lines.append(
                f"| {r.name} (`{r.run_id}`) | {r.factor} | {r.level} | {r.seed} | {r.status} | {why} |"
            )
        lines.append("")
    lines += [
        "## Per-seed values",
        "",
        *[
            f"- {row.claim.title}, {_metric(row)} ({row.section}): "
            + ", ".join(
                f"seed {s}: {v:+.2f}" if row.unit == "pp" else f"seed {s}: {v:.2f}x"
                for s, v in row.per_seed.items()
            )
            for row in rows
            if row.per_seed
        ],
        "",
    ]
    path.write_text("\n".join(lines))


def write_html(
    path: Path, title: str, claims: list[Claim], rows: list[Row], runs: list[RunRecord], plots: dict[str, str]
) -> None:
    esc = html.escape

    def table(cells: list[list[str]]) -> str:
        head = "".join(f"<th>{esc(c)}</th>" for c in cells[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c.strip('*'))}</td>" for c in row) + "</tr>" for row in cells[1:]
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:80em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "img{max-width:48em}</style></head><body>",
        f"<h1>{esc(title)}</h1><p>{esc(VERDICT_RULE.replace('*', ''))}</p>",
    ]
    for text, group in _contexts(rows).items():
        parts.append(f"<h2>Runs with {esc(text)}</h2>{table(_table(group))}")
        notes = dict.fromkeys(f"{row.claim.title}: {note}" for row in group for note in row.notes)
        if notes:
            parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
        for name, file in plots.items():
            if name.startswith(text):
                parts.append(f"<p><img src='{esc(file)}' alt='{esc(name)}'></p>")
    missing = _not_measured(claims, rows)
    if missing:
        parts.append("<h2>Claims without runs of both arms in this experiment</h2><ul>")
        parts += [
            f"<li>{esc(c.title)} (section {esc(c.section)}): <code>{esc(c.command)}</code></li>"
            for c in missing
        ]
        parts.append("</ul>")
    lost = _unfinished(runs)
    parts.append("<h2>Runs that did not finish</h2>")
    cells = [["run", "factor", "level", "seed", "status", "why"]] + [
        [f"{r.name} ({r.run_id})", r.factor, r.level, str(r.seed), r.status, r.why_not_finished()[:200]]
        for r in lost
    ]
    parts.append(table(cells) if lost else "<p>None: every run tagged by an arm finished.</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def plot(out: Path, rows: list[Row], curves: list[Figure1Curves]) -> dict[str, str]:
    """One forest plot per context (ours vs the paper, per claim) and Figure 1's curves. Name -> file."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    files = {}
    for i, (text, group) in enumerate(_contexts(rows).items()):
        deltas = [r for r in group if r.unit == "pp"]
        if not deltas:
            continue
        fig, ax = plt.subplots(figsize=(9, 0.55 * len(deltas) + 1.8))
        for y, row in enumerate(deltas):
            e = row.estimate
            if not math.isnan(e.low):
                ax.plot([e.low, e.high], [y, y], color="C0")
            ax.plot([e.mean], [y], "o", color="C0", label="ours: mean, 95% CI, seeds")
            ax.plot(list(row.per_seed.values()), [y] * len(row.per_seed), "|", color="C0", alpha=0.5)
            if row.measure.reported is not None:
                ax.plot([row.measure.reported], [y], "D", color="C3", label="paper")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(deltas)), [f"{r.claim.title}\n{_metric(r)}" for r in deltas], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("paper's choice minus ablated: points of error (< 0: the paper's choice is better)")
        ax.set_title(textwrap.fill(text, 110), fontsize=7)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))  # one legend entry per label
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        fig.tight_layout()
        name = f"deltas_{i}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files[f"{text} deltas"] = name
    for i, c in enumerate(curves):
        text = next((r.section for r in rows if r.context == c.context), c.context)
        fig, ax = plt.subplots(figsize=(6, 4))
        for colour, (arm, runs) in zip(("C0", "C1"), c.curves.items(), strict=False):
            for j, curve in enumerate(runs):
                xs, ys = zip(*curve, strict=True)
                ax.plot(xs, ys, color=colour, alpha=0.8, label=arm if j == 0 else None)
        ax.axhline(c.target, color="grey", ls="--", lw=0.8, label=f"target {c.target:.0%}")
        ax.set_xlabel("epochs")
        ax.set_ylabel("training error rate (top-1)")
        ax.set_title("Figure 1 protocol: each arm at its fastest learning rate", fontsize=9)
        ax.legend()
        fig.tight_layout()
        name = f"figure1_{i}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files[f"{text} figure1"] = name
    return files


# ---------------------------------------------------------------------------------------------------------
# The command


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")


def make_report(
    experiment: str,
    tracking_uri: str,
    out: Path,
    claims_file: Path = CLAIMS_FILE,
    filter_string: str = "",
    log_to_mlflow: bool = True,
) -> tuple[list[Row], list[RunRecord]]:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ReportError(
            f"No experiment {experiment!r} in the tracking store {tracking_uri} (it has: {names}). Run a "
            f"sweep first, e.g. python src/train.py -m +ablation=lrn experiment=cpu (into 'ablation_cpu')."
        )
    runs = fetch_runs(client, exp.experiment_id, filter_string)
    if not runs:
        raise ReportError(
            f"Experiment {experiment!r} has no runs tagged ablation.factor: run an ablation sweep "
            f"(python src/train.py -m +ablation=<claim>) into it first."
        )
    claims = load_claims(claims_file)
    rows, curves = analyse(claims, runs, client)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(out, rows, curves)
    title = f"AlexNet (2012) claims: measured vs reported - experiment {experiment}"
    write_markdown(out / "report.md", title, claims, rows, runs, plots)
    write_html(out / "report.html", title, claims, rows, runs, plots)
    (out / "claims.yaml").write_text(Path(claims_file).read_text())
    if log_to_mlflow:
        _log_report_run(client, exp.experiment_id, out, rows, runs)
    return rows, runs


def _log_report_run(
    client: MlflowClient, experiment_id: str, out: Path, rows: list[Row], runs: list[RunRecord]
) -> None:
    run = client.create_run(experiment_id, run_name="report", tags={REPORT_TAG: "true"})
    try:
        client.log_artifacts(run.info.run_id, str(out))
        for row in rows:
            key = f"{row.claim.name}.{row.measure.metric.replace('/', '_')}.{row.context}"
            client.set_tag(run.info.run_id, f"verdict.{key}", row.verdict)
            if not math.isnan(row.estimate.mean):
                client.log_metric(run.info.run_id, f"mean.{key}", row.estimate.mean)
        client.log_param(run.info.run_id, "runs_read", len(runs))
        client.log_param(run.info.run_id, "runs_not_finished", len(_unfinished(runs)))
        client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python src/report.py",
        description="Read an experiment's ablation runs back from MLflow and write the measured-vs-reported "
        "report (Markdown, HTML, PNG plots), also logged as the artifacts of a 'report' run.",
    )
    parser.add_argument("experiment", help="the MLflow experiment name, e.g. ablation_cpu (experiment=cpu)")
    parser.add_argument("--tracking-uri", default=default_tracking_uri(), help="default: %(default)s")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>)")
    parser.add_argument("--claims", type=Path, default=CLAIMS_FILE, help="default: %(default)s")
    parser.add_argument(
        "--filter", default="", help="an MLflow search filter, e.g. \"tags.sweep_dir = '...'\""
    )
    parser.add_argument("--no-log", action="store_true", help="do not log a report run to MLflow")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "reports" / args.experiment
    try:
        rows, runs = make_report(
            args.experiment, args.tracking_uri, out, args.claims, args.filter, not args.no_log
        )
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"\nwrote {out / 'report.md'}, {out / 'report.html'} and the plots; {len(runs)} runs read.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
