"""A sweep's parent run as the MLflow UI shows it: RUNNING while any of its jobs runs, then ended with the
sweep's counts (finished, failed, killed) as metrics; once a report has read its runs, a link to the report.

The parent is created by the sweep's first job (alexnet.tracking.sweep_parent). Each job marks it RUNNING
when it starts and, when it ends, counts its siblings; the job that finds none still running ends it. A job
killed without a word (SIGKILL) stays RUNNING in the store, and so does its parent, until a rerun ends it.
"""

from __future__ import annotations

import logging
from collections import Counter

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

log = logging.getLogger(__name__)
COUNTED = ("FINISHED", "FAILED", "KILLED", "RUNNING")
REPORT_LINK = "alexnet.report_run"  # on a parent: the run of the last report that read its jobs


def _parent(client: MlflowClient, run_id: str) -> str | None:
    return client.get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID)


def job_started(client: MlflowClient, run_id: str) -> None:
    try:
        if parent := _parent(client, run_id):
            client.update_run(parent, status="RUNNING")
    except Exception as err:  # noqa: BLE001 - the parent is a view of the jobs: never fail a job for it
        log.warning("could not mark the sweep's parent run RUNNING: %s", err)


def job_ended(client: MlflowClient, run_id: str) -> None:
    """The sweep's counts on its parent; the parent ended once no job of it is running."""
    try:
        parent = _parent(client, run_id)
        if parent is None:
            return
        experiment = client.get_run(parent).info.experiment_id
        jobs = client.search_runs(
            [experiment],
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'",
            ViewType.ACTIVE_ONLY,
            max_results=10_000,
        )
        counts = Counter(job.info.status for job in jobs)
        for status in COUNTED:
            client.log_metric(parent, f"sweep/{status.lower()}", counts.get(status, 0))
        if not counts.get("RUNNING"):
            client.set_terminated(parent, "FAILED" if counts.get("FAILED") else "FINISHED")
    except Exception as err:  # noqa: BLE001 - as above
        log.warning("could not update the sweep's parent run: %s", err)


def link_report(client: MlflowClient, parents: set[str], report_run: str, experiment_id: str) -> None:
    """Each parent names the report that read its jobs, with a link to its HTML (the run's description)."""
    page = f"#/experiments/{experiment_id}/runs/{report_run}/artifacts/report.html"
    for parent in sorted(parents):
        client.set_tag(parent, REPORT_LINK, report_run)
        client.set_tag(parent, "mlflow.note.content", f"The report of these runs: [report.html]({page})")
