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

import math
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

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


def make_logger(cfg: DictConfig, job: dict[str, Any]) -> MLFlowLogger:
    """Create the job's MLflow run and record its config before any training starts.

    Creating the run here, not lazily at the first metric, means a wrong tracking URI or an unwritable
    store fails in the first second, and a job that dies later still leaves a run that says so.
    """
    uri = cfg.logger.tracking_uri
    # A server stores artifacts where it was told to (--artifacts-destination); a path on this machine
    # would be unreadable to everyone else, so the configured location applies to local stores only.
    local = not uri.startswith(("http://", "https://")) and cfg.logger.artifact_location
    artifact_location = Path(cfg.logger.artifact_location).resolve().as_uri() if local else None
    logger = MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        run_name=run_name(job.get("overrides", [])),
        tracking_uri=uri,
        artifact_location=artifact_location,
        tags=run_tags(cfg, job),
        log_model=False,
    )
    logger.log_hyperparams(flatten(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (Path(tmp) / "overrides.yaml").write_text(
            OmegaConf.to_yaml(OmegaConf.create(list(job.get("overrides", []))))
        )
        logger.experiment.log_artifacts(logger.run_id, tmp)
    return logger


def log_summary(logger: MLFlowLogger, summary: dict[str, float | None], step: int) -> None:
    """Per-run numbers as metrics; a target never reached is the tag ``epochs_to_target=never``."""
    metrics = {k: v for k, v in summary.items() if v is not None and not math.isnan(v)}
    logger.log_metrics(metrics, step=step)
    if summary.get("final/epochs_to_target") is None:
        logger.experiment.set_tag(logger.run_id, "epochs_to_target", "never")


def mark_failed(logger: MLFlowLogger, error: BaseException) -> None:
    """End the run as FAILED with the error as a tag and the traceback as ``error.txt``."""
    client: MlflowClient = logger.experiment
    client.set_tag(logger.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "error.txt"
        path.write_text("".join(traceback.format_exception(error)))
        client.log_artifact(logger.run_id, str(path))
    client.set_terminated(logger.run_id, "FAILED")
