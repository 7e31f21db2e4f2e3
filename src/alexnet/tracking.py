"""MLflow: where runs go, what each run records, and how a failure is kept.

Every training job is one MLflow run that holds
- params: the experiment's keys (alexnet.identity: every resolved switch, ``data.fingerprint``) and the seed;
- metrics: the per-epoch curves from ``AlexNetModule`` and the per-run summary;
- tags: seed, git commit, Hydra job number, sweep dir, output dir, ablation factor/level when set;
- artifacts: ``config.yaml`` (the whole resolved config) and ``overrides.yaml`` (the command line),
  ``test_outcomes.npz`` (each test image right or wrong), and ``error.txt`` when the job failed.

The jobs of one sweep (a Hydra multirun, or an Optuna study) are nested under one parent run. Any tracking
URI MLflow accepts works: the default SQLite file, or ``http://host:5000``. A job holds a lease on the run it
trains (alexnet.lease), and a run's last checkpoint can live in the store, for any machine to resume from
(alexnet.handover). A password never reaches the tracker, a log line or the console (alexnet.redaction).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import traceback
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

from alexnet import handover, lease
from alexnet.errors import TrackingError
from alexnet.identity import experiment_params, run_key, run_name
from alexnet.redaction import (
    mask_log_records,
    mask_output,
    mask_secrets,
    mask_url,
    quiet_run_links,
    remember_url,
)
from alexnet.results import (  # noqa: F401 - what a run records at its end; the task and report use them here
    HEADLINE,
    OUTCOMES_ARTIFACT,
    labels_digest,
    log_outcomes,
    log_summary,
    read_outcomes,
    summary_of,
)

log = logging.getLogger(__name__)

# Before Hydra logs its first line or prints its first error: src/train.py and src/eval.py import this module
# first. (The console only for the project's scripts: not in a test process, whose streams pytest swaps.)
mask_log_records()
if sys.argv and Path(sys.argv[0]).resolve().parent == Path(__file__).resolve().parents[1]:
    mask_output()

# MLflow 3's UI opens an experiment of this kind on its table of training runs (not on the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout this package was installed from (pip -e)
SWEEP_TAG = "alexnet.sweep"  # on a sweep's parent run: the digest of the sweep's command line


def git_commit(root: Path) -> str:
    """HEAD of the checkout at ``root`` (``-dirty`` when tracked files changed); ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: DictConfig, job: dict[str, Any]) -> dict[str, str]:
    tags = {
        "seed": str(cfg.seed),
        # The code's own checkout, not paths.root_dir: outputs may live anywhere, the commit is the code's.
        "git_commit": git_commit(CODE_ROOT),
        "hydra_job_num": str(job.get("num", 0)),
        "output_dir": str(job.get("output_dir", "")),
        # The command line that made the run, without where things went: the report prints it.
        "overrides": mask_secrets(" ".join(o for o in job.get("overrides", []) if _says_what(o))),
    }
    if job.get("sweep_dir"):
        tags["sweep_dir"] = str(job["sweep_dir"])
    for key in ("factor", "level"):
        value = (cfg.get("ablation") or {}).get(key)
        if value is not None:
            tags[f"ablation.{key}"] = str(value)
    return tags


_WHERE = ("logger.", "paths.", "hydra.", "hydra/", "trainer.enable_", "data.root", "data.cache_dir")
# ...except the experiment: a command the report prints must add its runs to the experiment it reads.
_WHAT = ("logger.experiment_name=",)


def _says_what(override: str) -> bool:
    """Whether an override says what a run is, rather than where its files and records went."""
    return override.startswith(_WHAT) or not override.startswith(_WHERE)


def tracking_uri(cfg: DictConfig) -> str:
    uri = str(cfg.logger.tracking_uri)
    remember_url(uri)  # its password is masked also where an error quotes it without the URL
    if uri.startswith("sqlite:") and "timeout=" not in uri:
        # Parallel jobs share one SQLite file: wait up to a minute for another writer's lock instead of
        # failing at once with "database is locked" (Python's default wait is 5 s).
        uri += ("&" if "?" in uri else "?") + "timeout=60"
    return uri


def check_reachable(uri: str, seconds: float = 10.0) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    # urllib takes no user:password@ in a URL (MLflow's client, through requests, does): send it as the
    # Basic authentication header that requests would send.
    parts = urllib.parse.urlsplit(uri.rstrip("/"))
    address = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl()
    request = urllib.request.Request(f"{address}/health")
    if parts.username is not None:
        userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(userinfo.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=seconds) as response:
            response.read()
    except (OSError, ValueError) as err:
        raise TrackingError(
            f"Cannot reach the MLflow tracking server at {mask_url(uri)} ({mask_secrets(str(err))}). "
            "Start it (mlflow server --host ... --port ..., or scripts/team_server.py), fix "
            "logger.tracking_uri / MLFLOW_TRACKING_URI, or unset it to use the local SQLite store."
        ) from None


@contextmanager
def store_lock(uri: str):
    """Serialise first-time schema creation and experiment creation between processes on a SQLite store:
    both race when several jobs of a parallel sweep start together on a new file."""
    path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else None
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=300):
        yield


def experiment_id(client: MlflowClient, cfg: DictConfig, uri: str) -> str:
    """The id of ``logger.experiment_name``, created if needed (artifacts in ``logger.artifact_location`` for
    a local store; a server stores them where it was told to, --artifacts-destination)."""
    name = cfg.logger.experiment_name
    local = not uri.startswith(("http://", "https://")) and cfg.logger.artifact_location
    location = Path(cfg.logger.artifact_location).resolve().as_uri() if local else None
    try:
        with store_lock(uri):
            experiment = client.get_experiment_by_name(name)
            if experiment is None or experiment.lifecycle_stage == "deleted":
                try:
                    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
                except MlflowException as err:  # on a server, another job of the sweep created it first
                    if err.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is not None:
                        raise
                    experiment = client.get_experiment_by_name(name)
            for key, value in EXPERIMENT_KIND.items():
                if key not in experiment.tags:
                    client.set_experiment_tag(experiment.experiment_id, key, value)
            return experiment.experiment_id
    except MlflowException as err:
        raise TrackingError(
            f"Cannot use the MLflow store {mask_url(uri)}: {mask_secrets(str(err))}"
        ) from None


class RunLogger(MLFlowLogger):
    """Lightning ends the MLflow run FINISHED as soon as ``fit`` returns; the task still has to test and
    log the summary. A run killed then would look complete and never be resumed, so success is left to
    ``finish``; failures still end the run at once. With ``uploader``, each epoch's checkpoint goes to the
    store too. Once another job has taken the run over (``held.lost``), nothing more is written to it."""

    held: lease.Lease | None = None
    uploader: handover.Uploader | None = None

    def _ours(self) -> bool:
        return self.held is None or self.held.lost is None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.held is not None:
            self.held.check()  # stops the training of a job that lost its run
        super().log_metrics(metrics, step)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if self.uploader is not None and self._ours():
            self.uploader(checkpoint_callback)

    def finalize(self, status: str = "success") -> None:
        if status != "success" and self._ours():
            super().finalize(status)


def finish(logger: MLFlowLogger) -> None:
    logger.experiment.set_terminated(logger.run_id, "FINISHED")


@dataclass
class TrackedRun:
    """The job's MLflow run, and what an earlier attempt left for it."""

    logger: MLFlowLogger | None  # None when the job already finished: nothing to do
    run_id: str
    checkpoint_dir: Path
    resume_from: Path | None = None  # the last checkpoint of an interrupted attempt
    finished: Run | None = None  # the earlier run, when it finished (or diverged)
    lock: FileLock | None = None  # held while this process trains the config (resume=auto)
    held: lease.Lease | None = None  # this job's lease on the run, beating while it trains

    @property
    def lost(self) -> bool:
        """Whether another job took the run over: then this one must not end it."""
        return self.held is not None and self.held.lost is not None

    def release(self) -> None:
        if self.held is not None:
            self.held.release()
        if self.lock is not None:
            self.lock.release()


def open_run(cfg: DictConfig, job: dict[str, Any], fingerprint: str) -> TrackedRun:
    """Find or create the job's MLflow run before any training starts, and take its lease (alexnet.lease).

    With ``resume=auto`` (the default) a job whose configuration (``run_key``) already has a run in the
    experiment continues it: a FINISHED or diverged run is not trained again; an interrupted or failed one
    goes on from its last checkpoint (this machine's, or the store's: alexnet.handover), in the same run, so
    its metric history stays one curve. A run that another live job holds, here or on another machine, is
    left alone: ``lease.Held``, which the task reports as a skip. Creating the run here, not at the first
    metric, means a wrong URI or an unwritable store fails in the first second, and a job that dies later
    still leaves a run that says so.
    """
    uri = tracking_uri(cfg)
    held = lease.Lease(uri, lease.seconds_of(cfg.logger))
    upload = handover.enabled(cfg.logger.get("checkpoint_artifact", "auto"), uri)
    quiet_run_links(uri)
    check_reachable(uri)
    with store_lock(uri):  # on a new SQLite file MlflowClient creates the tables: parallel jobs race for it
        client = MlflowClient(uri)
    exp = experiment_id(client, cfg, uri)
    key = run_key(cfg, fingerprint)
    checkpoints = Path(cfg.paths.checkpoint_dir)
    lock = previous = resume_from = None
    try:
        if cfg.resume == "auto":  # with resume=never the run is new, and so is its checkpoint folder: no lock
            lock = lease.local_lock(checkpoints, key)
            found = client.search_runs(
                [exp], f"tags.run_key = '{key}'", order_by=["attributes.start_time DESC"]
            )
            previous = found[0] if found else None
        if previous is not None and (
            previous.info.status == "FINISHED" or previous.data.tags.get("diverged") == "true"
        ):
            lock.release()
            return TrackedRun(
                None, previous.info.run_id, checkpoints / previous.info.run_id, finished=previous
            )
        if previous is not None:
            run_id = previous.info.run_id
            lease.take_over(client, previous, held)
            held.start()  # before the download: a large checkpoint takes a while
            resume_from = handover.fetch(client, previous, checkpoints / run_id)
            client.set_tag(run_id, "resumed_from", str(resume_from) if resume_from else "start")
        else:
            run_id = _new_run(client, exp, cfg, job, key, held)
            held.start()
        logger = RunLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=uri, run_id=run_id)
        if previous is None:
            _record(logger, cfg, job, fingerprint)
        client.set_tag(run_id, "checkpoint_dir", str(checkpoints / run_id))
    except BaseException:
        held.release()
        if lock is not None:
            lock.release()
        raise
    logger.held = held
    if upload:
        logger.uploader = handover.Uploader(client, run_id, checkpoints / run_id)
    return TrackedRun(logger, run_id, checkpoints / run_id, resume_from=resume_from, lock=lock, held=held)


def _new_run(client: MlflowClient, exp: str, cfg: DictConfig, job: dict[str, Any], key: str,
             held: lease.Lease) -> str:  # fmt: skip
    """A new run, with this job's lease in its first tags."""
    tags = run_tags(cfg, job) | {
        "run_key": key,
        "attempts": "1",
        "host": lease.host(),
        MLFLOW_RUN_NAME: run_name(job.get("overrides", [])),
        lease.LEASE_TAG: held.value(),
    }
    parent = sweep_parent(client, exp, cfg, job)
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    held.run_id = client.create_run(exp, tags=tags).info.run_id
    if cfg.resume == "auto":
        lease.keep_first(client, exp, key, held)
    return held.run_id


def _record(logger: MLFlowLogger, cfg: DictConfig, job: dict[str, Any], fingerprint: str) -> None:
    """A new run's params, ``config.yaml`` and ``overrides.yaml``; a store that cannot take them fails it."""
    client, run_id = logger.experiment, logger.run_id
    try:
        params = experiment_params(cfg, fingerprint) | {"seed": str(cfg.seed)}
        logger.log_hyperparams({k: mask_secrets(v) for k, v in params.items()})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(mask_secrets(OmegaConf.to_yaml(cfg, resolve=True)))
            overrides = OmegaConf.to_yaml(OmegaConf.create(list(job.get("overrides", []))))
            (Path(tmp) / "overrides.yaml").write_text(mask_secrets(overrides))
            client.log_artifacts(run_id, tmp)
    except (OSError, MlflowException) as err:
        error = TrackingError(
            f"Cannot record run {run_id} in {mask_url(tracking_uri(cfg))} (artifacts: "
            f"{client.get_run(run_id).info.artifact_uri}): {mask_secrets(str(err))}. Check that the "
            "artifact folder (logger.artifact_location) exists, is writable and has free space."
        )
        mark_failed(logger, error)
        raise error from None


def sweep_parent(client: MlflowClient, exp: str, cfg: DictConfig, job: dict[str, Any]) -> str | None:
    """The parent run of the sweep this job belongs to (None outside a sweep), created by whichever job
    comes first. A sweep is its command line (every job reads it from the sweep folder's multirun.yaml), or
    its Optuna study: rerunning the same command nests the resumed and remaining jobs under the same parent.
    A file lock serialises the jobs of one machine; across machines the oldest parent wins."""
    study = (cfg.get("optuna") or {}).get("study")
    command = job.get("sweep_overrides")
    if study is None and command is None:
        return None
    label = f"study {study}" if study else "sweep: " + " ".join(filter(_says_what, command))
    key = hashlib.sha256(json.dumps([cfg.logger.experiment_name, study or command]).encode()).hexdigest()[:24]
    lock_dir = Path(cfg.paths.checkpoint_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_dir / f"sweep-{key}.lock", timeout=300):
        found = client.search_runs(
            [exp], f"tags.`{SWEEP_TAG}` = '{key}'", order_by=["attributes.start_time ASC"]
        )
        if found:
            return found[0].info.run_id
        # RUNNING until its last job ends (alexnet.sweeps): it trains nothing itself
        run = client.create_run(exp, tags={SWEEP_TAG: key, MLFLOW_RUN_NAME: mask_secrets(label)[:250]})
        return run.info.run_id


def mark_failed(logger: MLFlowLogger, error: BaseException, status: str = "FAILED") -> None:
    """End the run as FAILED (or KILLED) with the error as a tag and the traceback as ``error.txt``.

    Each step is tried on its own: when the artifact store is what failed, the status and the tag still land.
    """
    client: MlflowClient = logger.experiment
    text = mask_secrets("".join(traceback.format_exception(error)))
    steps = (
        lambda: client.set_tag(
            logger.run_id, "error", mask_secrets(f"{type(error).__name__}: {error}")[:5000]
        ),
        lambda: _log_text(client, logger.run_id, "error.txt", text),
        lambda: client.set_terminated(logger.run_id, status),
    )
    for step in steps:
        try:
            step()
        except Exception as err:  # noqa: BLE001 - report every failure, lose none of the others
            log.error("could not record the failure of run %s in MLflow: %s", logger.run_id, err)


def _log_text(client: MlflowClient, run_id: str, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path))


def tag_run(logger: MLFlowLogger, tags: dict[str, str], status: str | None = None) -> None:
    """Add tags to the run; with ``status``, also end it so (e.g. KILLED for a trial the pruner stopped)."""
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, mask_secrets(value)[:5000])
    if status is not None:
        logger.experiment.set_terminated(logger.run_id, status)
