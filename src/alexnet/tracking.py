"""MLflow: where runs go, what each run records, and how a failure is kept.

Every training job is one MLflow run that holds
- params: the experiment's keys (alexnet.identity: every resolved switch, ``data.fingerprint``) and the seed;
- metrics: the per-epoch curves from ``AlexNetModule`` and the per-run summary;
- tags: seed, git commit, Hydra job number, sweep dir, output dir, ablation factor/level when set;
- artifacts: ``config.yaml`` (the whole resolved config) and ``overrides.yaml`` (the command line),
  ``test_outcomes.npz`` (each test image right or wrong), and ``error.txt`` when the job failed.

The jobs of one sweep (a Hydra multirun, or an Optuna study) are nested under one parent run. Any tracking
URI MLflow accepts works: the default SQLite file, or ``http://host:5000``. A password in a URL (a tracking
server's or a database's) never reaches the tracker or a log line (alexnet.redaction).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import subprocess
import tempfile
import traceback
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

from alexnet.errors import TrackingError
from alexnet.identity import config_lock, experiment_params, run_key, run_name
from alexnet.redaction import mask_log_records, mask_secrets, quiet_run_links

log = logging.getLogger(__name__)

# Before Hydra logs its first line: src/train.py imports this module first.
mask_log_records()

OUTCOMES_ARTIFACT = "test_outcomes.npz"
# MLflow 3's UI opens an experiment of this kind on its table of training runs (not on the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The numbers a reader looks for first, also under one prefix, so that they sort together in the UI's column
# picker and charts (type "headline"): summary key -> headline name.
HEADLINE = {
    "test/top1_err_1crop": "headline/test_top1_err",
    "test/top5_err_1crop": "headline/test_top5_err",
    "test/top1_err_10crop": "headline/test_top1_err_10views",
    "best/val_top1_err": "headline/val_top1_err_best",
    "final/epochs_to_target": "headline/epochs_to_target",
}
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
        "git_commit": git_commit(Path(cfg.paths.root_dir)),
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
            f"Cannot reach the MLflow tracking server at {mask_secrets(uri)} ({mask_secrets(str(err))}). "
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
                return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            for key, value in EXPERIMENT_KIND.items():
                if key not in experiment.tags:
                    client.set_experiment_tag(experiment.experiment_id, key, value)
            return experiment.experiment_id
    except MlflowException as err:
        raise TrackingError(
            f"Cannot use the MLflow store {mask_secrets(uri)}: {mask_secrets(str(err))}"
        ) from None


class RunLogger(MLFlowLogger):
    """Lightning ends the MLflow run FINISHED as soon as ``fit`` returns; the task still has to test and
    log the summary. A run killed then would look complete and never be resumed, so success is left to
    ``finish``; failures still end the run at once."""

    def finalize(self, status: str = "success") -> None:
        if status != "success":
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

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run(cfg: DictConfig, job: dict[str, Any], fingerprint: str) -> TrackedRun:
    """Find or create the job's MLflow run before any training starts.

    With ``resume=auto`` (the default) a job whose configuration (``run_key``) already has a run in the
    experiment continues it: a FINISHED or diverged run is not trained again; an interrupted or failed one
    goes on from its last checkpoint, in the same run, so its metric history stays one curve. Creating the
    run here, not at the first metric, means a wrong URI or an unwritable store fails in the first second,
    and a job that dies later still leaves a run that says so.
    """
    uri = tracking_uri(cfg)
    quiet_run_links(uri)
    check_reachable(uri)
    with store_lock(uri):  # on a new SQLite file MlflowClient creates the tables: parallel jobs race for it
        client = MlflowClient(uri)
    exp = experiment_id(client, cfg, uri)
    key = run_key(cfg, fingerprint)
    checkpoints = Path(cfg.paths.checkpoint_dir)
    lock = previous = None
    if cfg.resume == "auto":  # with resume=never the run is new, and so is its checkpoint folder: no lock
        lock = config_lock(checkpoints, key)
        found = client.search_runs([exp], f"tags.run_key = '{key}'", order_by=["attributes.start_time DESC"])
        previous = found[0] if found else None
    if previous is not None:
        run_id = previous.info.run_id
        if previous.info.status == "FINISHED" or previous.data.tags.get("diverged") == "true":
            lock.release()
            return TrackedRun(None, run_id, checkpoints / run_id, finished=previous)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "attempts", str(int(previous.data.tags.get("attempts", "1")) + 1))
        last = checkpoints / run_id / "last.ckpt"
        resume_from = last if last.is_file() else None
        client.set_tag(run_id, "resumed_from", str(resume_from) if resume_from else "start")
        logger = RunLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=uri, run_id=run_id)
        return TrackedRun(logger, run_id, checkpoints / run_id, resume_from=resume_from, lock=lock)

    tags = run_tags(cfg, job) | {
        "run_key": key,
        "attempts": "1",
        MLFLOW_RUN_NAME: run_name(job.get("overrides", [])),
    }
    parent = sweep_parent(client, exp, cfg, job)
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    run_id = client.create_run(exp, tags=tags).info.run_id
    logger = RunLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=uri, run_id=run_id)
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
            f"Cannot record run {run_id} in {mask_secrets(uri)} (artifacts: "
            f"{client.get_run(run_id).info.artifact_uri}): {err}. Check that the artifact folder "
            "(logger.artifact_location) exists, is writable and has free space."
        )
        mark_failed(logger, error)
        raise error from None
    client.set_tag(run_id, "checkpoint_dir", str(checkpoints / run_id))
    return TrackedRun(logger, run_id, checkpoints / run_id, lock=lock)


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
        run = client.create_run(exp, tags={SWEEP_TAG: key, MLFLOW_RUN_NAME: mask_secrets(label)[:250]})
        client.set_terminated(run.info.run_id, "FINISHED")  # a folder for its children; it trains nothing
        return run.info.run_id


def summary_of(run: Run) -> dict[str, float | None]:
    """The per-run numbers of a finished run, as the task returns them."""
    summary = {k: v for k, v in run.data.metrics.items() if k.startswith(("best/", "final/", "test/"))}
    if run.data.tags.get("epochs_to_target") == "never":
        summary |= {"final/epochs_to_target": None, "final/seconds_to_target": None}
    return summary


def log_summary(logger: MLFlowLogger, summary: dict[str, float | None], step: int) -> None:
    """Per-run numbers as metrics; a target never reached is the tag ``epochs_to_target=never``."""
    metrics = {k: v for k, v in summary.items() if v is not None and not math.isnan(v)}
    metrics |= {HEADLINE[k]: v for k, v in metrics.items() if k in HEADLINE}
    logger.log_metrics(metrics, step=step)
    if summary.get("final/epochs_to_target") is None:
        logger.experiment.set_tag(logger.run_id, "epochs_to_target", "never")


def log_outcomes(
    logger: MLFlowLogger, outcomes: dict[str, np.ndarray], labels: np.ndarray, prefix: str | None = None
) -> None:
    """Each test image's outcome as ``test_outcomes.npz`` (under ``prefix/`` if given): packed bits, a few kB
    for 10,000 images, plus a digest of the labels so that the report pairs only runs tested on the same
    images in the same order."""
    if not outcomes:
        return
    buffer = io.BytesIO()
    packed = {k: np.packbits(v) for k, v in outcomes.items()}
    np.savez_compressed(buffer, images=np.int64(len(labels)), labels_sha=labels_digest(labels), **packed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / OUTCOMES_ARTIFACT
        path.write_bytes(buffer.getvalue())
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=prefix)


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def read_outcomes(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """``test_outcomes.npz`` back as booleans per image, and its labels digest."""
    with np.load(path) as data:
        n = int(data["images"])
        outcomes = {
            k: np.unpackbits(data[k])[:n].astype(bool)
            for k in data.files
            if k not in ("images", "labels_sha")
        }
        return outcomes, str(data["labels_sha"])


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
