"""MLflow: where runs go, what each run records, and how a failure is kept.

Every training job is one MLflow run that holds
- params: every resolved config value under its dotted key (``model.activation``, ``optimizer.lr``, ...);
- metrics: the per-epoch curves from ``AlexNetModule`` and the per-run summary;
- tags: seed, git commit, Hydra job number, sweep dir, output dir, ablation factor/level when set;
- artifacts: ``config.yaml`` (the resolved config) and ``overrides.yaml`` (the command-line overrides), and
  ``error.txt`` when the job failed.

All jobs of a Hydra multirun share one experiment (``logger.experiment_name``), so ``mlflow ui`` shows them
side by side. Any tracking URI MLflow accepts works: the default SQLite file, or ``http://host:5000``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import tempfile
import traceback
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Overrides that say where things go, not what was trained: left out of run names.
_NOT_IN_RUN_NAME = (
    "paths.",
    "logger.",
    "hydra.",
    "data.root",
    "data.num_workers",
    "trainer.enable_",
    "trainer.log_every",
)
MAX_PARAM_LENGTH = 6000  # MLflow 3's limit for a param value


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Every leaf of the resolved config as ``dotted.key -> str(value)``."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")
        else:
            out[prefix[:-1]] = str(node)[:MAX_PARAM_LENGTH]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def run_name(overrides: list[str]) -> str:
    """What this job changed, e.g. ``activation=tanh seed=2``; ``default`` when nothing was overridden."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(_NOT_IN_RUN_NAME):
            continue
        parts.append(f"{key.split('.')[-1]}={value}")
    return " ".join(parts) or "default"


def git_commit(root: Path) -> str:
    """HEAD of the checkout at ``root`` (``-dirty`` when tracked files changed); ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: DictConfig, job: dict[str, Any]) -> dict[str, str]:
    tags = {
        "seed": str(cfg.seed),
        "git_commit": git_commit(Path(cfg.paths.root_dir)),
        "hydra_job_num": str(job.get("num", 0)),
        "output_dir": str(job.get("output_dir", "")),
    }
    if job.get("sweep_dir"):
        tags["sweep_dir"] = str(job["sweep_dir"])
    ablation = cfg.get("ablation") or {}
    for key in ("factor", "level"):
        if ablation.get(key) is not None:
            tags[f"ablation.{key}"] = str(ablation[key])
    return tags


class TrackingError(RuntimeError):
    """The MLflow store cannot be used. The message says which URI or folder, and what to do."""


# Keys that say where things go or how they are shown, not what is trained: two jobs that differ only in
# these are the same experiment (the same ``run_key``), so a rerun finds the first one's run to resume.
_NOT_IN_RUN_KEY = ("paths", "logger", "hydra", "resume", "optuna")
_NOT_IN_RUN_KEY_LEAVES = (
    "data.num_workers",
    "data.cache_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)


def run_key(cfg: DictConfig) -> str:
    """A digest of everything that decides what this job trains and measures."""
    values = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] not in _NOT_IN_RUN_KEY}
    for key in _NOT_IN_RUN_KEY_LEAVES:
        values.pop(key, None)
    # Where the network runs (the devices group) came after the first runs. On one device a job keeps the
    # digest it had before (trainer.devices 1, no strategy, no devices keys), so reruns still find those runs;
    # model parallel and DDP are runs of their own (a model-parallel checkpoint has another form).
    if values.get("devices.mode", "one") == "one":
        for key in ("devices.mode", "devices.count", "trainer.strategy"):
            values.pop(key, None)
        values["trainer.devices"] = "1"
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:24]


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
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=seconds) as response:
            response.read()
    except (OSError, ValueError) as err:
        raise TrackingError(
            f"Cannot reach the MLflow tracking server at {uri} ({err}). Start it (mlflow server --host ... "
            f"--port ...), fix logger.tracking_uri / MLFLOW_TRACKING_URI, or unset it to use the local "
            f"SQLite store."
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


class RunLogger(MLFlowLogger):
    """Lightning ends the MLflow run FINISHED as soon as ``fit`` returns; ``train()`` still has to test and
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
    lock: FileLock | None = None  # held while this process trains the config: see open_run


def open_run(cfg: DictConfig, job: dict[str, Any]) -> TrackedRun:
    """Find or create the job's MLflow run before any training starts.

    With ``resume=auto`` (the default) a job whose config (``run_key``) already has a run in the experiment
    continues it: a FINISHED or diverged run is not trained again; an interrupted or failed one goes on
    from its last checkpoint, in the same run, so its metric history stays one curve. Creating the run here,
    not at the first metric, means a wrong URI or an unwritable store fails in the first second, and a job
    that dies later still leaves a run that says so.
    """
    uri = tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(uri)
    name = cfg.logger.experiment_name
    # A server stores artifacts where it was told to (--artifacts-destination); a path on this machine
    # would be unreadable to everyone else, so the configured location applies to local stores only.
    local = not uri.startswith(("http://", "https://")) and cfg.logger.artifact_location
    artifact_location = Path(cfg.logger.artifact_location).resolve().as_uri() if local else None
    try:
        with store_lock(uri):
            experiment = client.get_experiment_by_name(name)
            if experiment is None or experiment.lifecycle_stage == "deleted":
                experiment_id = client.create_experiment(name, artifact_location=artifact_location)
            else:
                experiment_id = experiment.experiment_id
    except MlflowException as err:
        raise TrackingError(f"Cannot use the MLflow store {uri}: {err}") from None

    key = run_key(cfg)
    checkpoints = Path(cfg.paths.checkpoint_dir)
    # One process at a time per config: a second job with the same config (a sweep rerun while the first
    # still runs, two parallel trials that drew the same values) would write into the same run and the same
    # last.ckpt. The OS drops the lock when its process dies, so a killed job can still be resumed.
    checkpoints.mkdir(parents=True, exist_ok=True)
    lock = FileLock(checkpoints / f"{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TrackingError(
            f"A job with the same configuration (run_key {key}) is running in another process on this "
            f"machine (lock {lock.lock_file}). Wait for it, or pass resume=never to train a separate run."
        ) from None
    previous = None
    if cfg.get("resume", "auto") == "auto":
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.run_key = '{key}'", order_by=["attributes.start_time DESC"]
        )
        previous = found[0] if found else None
    if previous is not None:
        run_id = previous.info.run_id
        if previous.info.status == "FINISHED" or previous.data.tags.get("diverged") == "true":
            lock.release()
            return TrackedRun(None, run_id, checkpoints / run_id, finished=previous)
        attempts = int(previous.data.tags.get("attempts", "1")) + 1
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "attempts", str(attempts))
        last = checkpoints / run_id / "last.ckpt"
        resume_from = last if last.is_file() else None
        client.set_tag(run_id, "resumed_from", str(resume_from) if resume_from else "start")
        logger = RunLogger(experiment_name=name, tracking_uri=uri, run_id=run_id, log_model=False)
        return TrackedRun(logger, run_id, checkpoints / run_id, resume_from=resume_from, lock=lock)

    tags = run_tags(cfg, job) | {
        "run_key": key,
        "attempts": "1",
        MLFLOW_RUN_NAME: run_name(job.get("overrides", [])),
    }
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    logger = RunLogger(experiment_name=name, tracking_uri=uri, run_id=run_id, log_model=False)
    try:
        logger.log_hyperparams(flatten(cfg))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            overrides = OmegaConf.create(list(job.get("overrides", [])))
            (Path(tmp) / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
            client.log_artifacts(run_id, tmp)
    except (OSError, MlflowException) as err:
        error = TrackingError(
            f"Cannot record run {run_id} in {uri} (artifacts: {client.get_run(run_id).info.artifact_uri}): "
            f"{err}. Check that the artifact folder (logger.artifact_location) exists, is writable and has "
            f"free space."
        )
        mark_failed(logger, error)
        raise error from None
    client.set_tag(run_id, "checkpoint_dir", str(checkpoints / run_id))
    return TrackedRun(logger, run_id, checkpoints / run_id, lock=lock)


def summary_of(run: Run) -> dict[str, float | None]:
    """The per-run numbers of a finished run, as ``train()`` returns them."""
    summary = {k: v for k, v in run.data.metrics.items() if k.startswith(("best/", "final/", "test/"))}
    if run.data.tags.get("epochs_to_target") == "never":
        summary |= {"final/epochs_to_target": None, "final/seconds_to_target": None}
    return summary


def log_summary(logger: MLFlowLogger, summary: dict[str, float | None], step: int) -> None:
    """Per-run numbers as metrics; a target never reached is the tag ``epochs_to_target=never``."""
    metrics = {k: v for k, v in summary.items() if v is not None and not math.isnan(v)}
    logger.log_metrics(metrics, step=step)
    if summary.get("final/epochs_to_target") is None:
        logger.experiment.set_tag(logger.run_id, "epochs_to_target", "never")


def mark_failed(logger: MLFlowLogger, error: BaseException, status: str = "FAILED") -> None:
    """End the run as FAILED (or KILLED) with the error as a tag and the traceback as ``error.txt``.

    Each step is tried on its own: when the artifact store is what failed, the status and the tag still land.
    """
    client: MlflowClient = logger.experiment
    steps = (
        lambda: client.set_tag(logger.run_id, "error", f"{type(error).__name__}: {error}"[:5000]),
        lambda: _log_text(client, logger.run_id, "error.txt", "".join(traceback.format_exception(error))),
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
        logger.experiment.set_tag(logger.run_id, key, value[:5000])
    if status is not None:
        logger.experiment.set_terminated(logger.run_id, status)
