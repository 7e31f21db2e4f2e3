"""The runs, read back from MLflow: their params, metrics and per-image test outcomes, and the contexts
that say which of them may be compared.

Two runs are compared only if every experiment param (alexnet.identity) agrees except the seed and the
keys a claim's arms flip or tune: runs of different data sets, network sizes, schedules or learning rates
are never mixed in one comparison.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from alexnet.identity import is_experiment_key
from alexnet.report.claims import arm_of
from alexnet.tracking import OUTCOMES_ARTIFACT, SWEEP_TAG, read_outcomes

REPORT_TAG = "alexnet.report"
# Runs that train nothing: a report, a sweep's parent, an Optuna study's summary.
_NOT_TRAINING = (REPORT_TAG, SWEEP_TAG, "optuna.summary")
# What a reader needs to tell contexts apart at a glance (the full parameter set decides).
_CONTEXT_SUMMARY = ("model.arch", "data.dataset", "model.width", "data.train_size", "trainer.max_epochs")
# Per-run keys of a command line: what a sweep varies from job to job.
_JOB_KEYS = ("seed", "arm", "design.run", "hydra.job.num")


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    seed: int | None
    start: int  # ms since the epoch
    end: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    arm: str | None = None  # from its switches: alexnet.report.claims.arm_of
    outcomes: dict[str, np.ndarray] | None = field(default=None, repr=False)
    labels_sha: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def arch(self) -> str:
        return self.params.get("model.arch", "alexnet")

    def why_not_finished(self) -> str:
        if self.tags.get("diverged") == "true":
            return "diverged: " + self.tags.get("error", "")
        return self.tags.get("error", "still running, or killed before it could record why")


def _record(run: Run) -> RunRecord:
    tags, params = run.data.tags, dict(run.data.params)
    seed = tags.get("seed", params.get("seed"))
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        seed=int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
        start=run.info.start_time or 0,
        end=run.info.end_time,
        params=params,
        metrics=dict(run.data.metrics),
        tags=dict(tags),
        arm=arm_of(params),
    )


def fetch_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[RunRecord]:
    """Every training run of the experiment, whatever its status, oldest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs += [_record(r) for r in page if not any(t in r.data.tags for t in _NOT_TRAINING)]
        token = page.token
        if not token:
            return sorted(runs, key=lambda r: r.start)


def load_outcomes(client: MlflowClient, runs: Iterable[RunRecord]) -> None:
    """Each finished run's per-image test outcomes, where it has them."""
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            if run.outcomes is not None or not run.finished:
                continue
            try:
                path = client.download_artifacts(run.run_id, OUTCOMES_ARTIFACT, tmp)
            except Exception:  # noqa: BLE001 - a run from before outcomes were kept: seeds only
                continue
            run.outcomes, run.labels_sha = read_outcomes(Path(path))


def setting_of(run: RunRecord, ignore: Iterable[str]) -> dict[str, str]:
    """The run's experiment params, less the seed and ``ignore``: what must agree for runs to be compared."""
    ignore = set(ignore) | {"seed"}
    return {k: v for k, v in run.params.items() if is_experiment_key(k) and k not in ignore}


def digest(setting: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]


def context_of(run: RunRecord, ignore: Iterable[str]) -> str:
    """A digest of ``setting_of(run, ignore)``."""
    return digest(setting_of(run, ignore))


def by_context(runs: Iterable[RunRecord], ignore: Iterable[str]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[context_of(run, ignore)].append(run)
    return dict(sorted(groups.items()))


def describe(run: RunRecord) -> str:
    def value(key: str) -> str:
        shown = run.params.get(key, "-")
        return "all" if shown == "None" and key == "data.train_size" else shown  # null: the whole split

    return ", ".join(f"{k.split('.')[-1]}={value(k)}" for k in _CONTEXT_SUMMARY)


def latest_by_seed(runs: Iterable[RunRecord]) -> dict[int, RunRecord]:
    """One finished run per seed: the newest, when a seed was run twice (resume=never)."""
    chosen: dict[int, RunRecord] = {}
    for run in runs:  # oldest first: a newer run replaces an older one
        if run.finished and run.seed is not None:
            chosen[run.seed] = run
    return chosen


def command(
    runs: Iterable[RunRecord], sweep: str | None = None, seeds: Iterable[int] | None = None,
    fixed: dict[str, str] | None = None,
) -> str:  # fmt: skip
    """The multirun that made (or would complete) these runs: the overrides they share, the ones that vary
    from run to run as comma lists, and the sweep file when they came from one; ``fixed``: overrides that
    replace theirs (one arm, one rate)."""
    fixed = fixed or {}
    values: dict[str, list[str]] = defaultdict(list)
    runs = list(runs)
    for run in runs:
        for override in run.tags.get("overrides", "").split():
            key, _, value = override.partition("=")
            if value not in values[key]:
                values[key].append(value)
    from_sweep = sweep is not None and any(k.lstrip("+") == "ablation" for k in values)
    parts = []
    for key, found in values.items():
        if key.lstrip("+") == "ablation" or (from_sweep and key in _JOB_KEYS) or key in ("seed", *fixed):
            continue
        parts.append(f"{key}={','.join(found)}")
    head = [f"+ablation={sweep}"] if sweep is not None else []
    parts = head + [f"{k}={v}" for k, v in fixed.items()] + parts
    seeds = sorted(seeds if seeds is not None else {r.seed for r in runs if r.seed is not None})
    if seeds:
        parts.append("seed=" + ",".join(str(s) for s in seeds))
    return "python src/train.py -m " + " ".join(parts)


def common_overrides(runs: Iterable[RunRecord]) -> str:
    """The overrides most runs of the experiment share (their scale and data), without the per-job ones."""
    counts = Counter()
    for run in runs:
        kept = [o for o in run.tags.get("overrides", "").split() if o.partition("=")[0].lstrip("+~") not in
                (*_JOB_KEYS, "ablation", "model.activation", "optimizer.lr")]  # fmt: skip
        counts[" ".join(kept)] += 1
    return counts.most_common(1)[0][0] if counts else ""
