"""What a run records at its end: the per-run numbers (with their headline copies) and each test image's
outcome. alexnet.tracking re-exports these names, which the task and the report use."""

from __future__ import annotations

import hashlib
import io
import math
import tempfile
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Run

OUTCOMES_ARTIFACT = "test_outcomes.npz"
# The numbers a reader looks for first, also under one prefix, so that they sort together in the UI's column
# picker and charts (type "headline"): summary key -> headline name.
HEADLINE = {
    "test/top1_err_1crop": "headline/test_top1_err",
    "test/top5_err_1crop": "headline/test_top5_err",
    "test/top1_err_10crop": "headline/test_top1_err_10views",
    "best/val_top1_err": "headline/val_top1_err_best",
    "final/epochs_to_target": "headline/epochs_to_target",
}


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
