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
from datetime import datetime
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from alexnet.errors import ReportError
from alexnet.identity import is_experiment_key
from alexnet.redaction import mask_secrets
from alexnet.report.claims import arm_of
from alexnet.tracking import OUTCOMES_ARTIFACT, SWEEP_TAG, read_outcomes

REPORT_TAG = "alexnet.report"
# Runs that train nothing: a report, a sweep's parent, an Optuna study's summary.
_NOT_TRAINING = (REPORT_TAG, SWEEP_TAG, "optuna.summary")
# What a reader needs to tell contexts apart at a glance (the full parameter set decides).
_CONTEXT_SUMMARY = (
    "model.arch",
    "data.dataset",
    "model.width",
    "data.train_size",
    "trainer.max_epochs",
    "optimizer.schedule",
)
# Per-run keys of a command line: what a sweep varies from job to job.
_JOB_KEYS = ("seed", "arm", "design.run", "hydra.job.num")
# The per-epoch metrics a report reads (Figure 1's curves, take-off epochs), in step order.
HISTORY = ("train/top1_err", "val/top1_err")


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
    history: dict[str, list[float]] = field(default_factory=dict, repr=False)  # HISTORY, in step order
    outcomes_error: str | None = None  # why a finished run's outcomes could not be read

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


def new_record(
    run_id: str, name: str, status: str, start: int, end: int | None, params: dict[str, str],
    metrics: dict[str, float], tags: dict[str, str], history: dict[str, list[float]] | None = None,
) -> RunRecord:  # fmt: skip
    """A run as the report reads it, from MLflow or from a bundle: its seed and arm follow from the rest."""
    seed = tags.get("seed", params.get("seed"))
    return RunRecord(
        run_id=run_id, name=name, status=status,
        seed=int(seed) if seed is not None and seed.lstrip("-").isdigit() else None,
        start=start, end=end, params=params, metrics=metrics, tags=tags, arm=arm_of(params),
        history=history or {},
    )  # fmt: skip


def _record(client: MlflowClient, run: Run) -> RunRecord:
    metrics = dict(run.data.metrics)
    history = {
        key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in HISTORY
        if key in metrics
    }
    return new_record(
        run.info.run_id, run.info.run_name or run.info.run_id, run.info.status, run.info.start_time or 0,
        run.info.end_time, dict(run.data.params), metrics, dict(run.data.tags), history,
    )  # fmt: skip


def oldest_first(runs: Iterable[RunRecord]) -> list[RunRecord]:
    """By start time, then run id: the same order from a store and from a bundle, ties included."""
    return sorted(runs, key=lambda r: (r.start, r.run_id))


def search_filter(filter_string: str, ended_before: datetime | None) -> str:
    """``filter_string``, and given a time, only the runs that had ended by then: a run still going has no
    end time, so the filter leaves it out (the runs as they stood at that time)."""
    ended = f"attributes.end_time < {round(ended_before.timestamp() * 1000)}" if ended_before else ""
    return " and ".join(f for f in (filter_string, ended) if f)


def find_experiment(client: MlflowClient, experiment: str) -> str:
    """The id of ``experiment`` in the client's store, or a one-line error that lists what it has."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ReportError(
            f"No experiment {experiment!r} in the tracking store {mask_secrets(client.tracking_uri)} (it "
            f"has: {names}). Run a sweep first, e.g. python src/train.py -m +ablation=lrn experiment=cpu "
            "(into 'ablation_cpu')."
        )
    return exp.experiment_id


def fetch_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[RunRecord]:
    """Every training run of the experiment, whatever its status, oldest first, with its HISTORY."""
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(
                [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
        except MlflowException as err:  # most often a malformed filter
            raise ReportError(
                f"Cannot search the runs (filter {filter_string!r}): {first_line(err)}"
            ) from None
        runs += [_record(client, r) for r in page if not any(t in r.data.tags for t in _NOT_TRAINING)]
        token = page.token
        if not token:
            return oldest_first(runs)


def first_line(err: BaseException) -> str:
    """An exception as one line for a person, passwords in URLs masked."""
    text = mask_secrets(str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_outcomes(client: MlflowClient, runs: Iterable[RunRecord]) -> None:
    """Each finished run's per-image test outcomes. A run that never kept them (made before they were)
    has none; one whose file cannot be listed, downloaded or read gets ``outcomes_error`` (never silently
    demoted to its seeds: ``check_outcomes``)."""
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            if run.outcomes is not None or not run.finished:
                continue
            try:
                if OUTCOMES_ARTIFACT not in {a.path for a in client.list_artifacts(run.run_id)}:
                    continue
                path = client.download_artifacts(run.run_id, OUTCOMES_ARTIFACT, tmp)
                run.outcomes, run.labels_sha = read_outcomes(Path(path))
            except Exception as err:  # noqa: BLE001 - whatever failed, the run is named (check_outcomes)
                run.outcomes_error = f"{type(err).__name__}: {first_line(err)}"


def check_outcomes(runs: Iterable[RunRecord], allow_seeds_only: bool) -> None:
    """A finished run whose outcomes cannot be read stops the report, unless the user lets its rows fall
    back to the seeds' noise alone (``--allow-seeds-only``)."""
    bad = [r for r in runs if r.outcomes_error]
    if bad and not allow_seeds_only:
        more = f" (and {len(bad) - 1} more run(s))" if len(bad) > 1 else ""
        raise ReportError(
            f"Run {bad[0].name} ({bad[0].run_id}) finished but its per-image test outcomes "
            f"({OUTCOMES_ARTIFACT}) cannot be read: {bad[0].outcomes_error}{more}. Fix the artifact store "
            "(or export the bundle again), or pass --allow-seeds-only to compare such runs on their seeds "
            "alone."
        )


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
