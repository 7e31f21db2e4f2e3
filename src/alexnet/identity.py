"""Run identity: which config keys are the experiment, the digest that names a configuration, and the lock
that keeps two processes from training one configuration at once.

``NOT_EXPERIMENT`` is the one list of keys that say where things go or how they are shown, not what is
trained and measured. Two jobs that differ only in these are the same experiment: the same ``run_key`` (so a
rerun finds the first one's run and resumes or skips it), the same report context, and no MLflow params for
them (the whole config, secrets masked, is the run's ``config.yaml``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from alexnet.errors import TrackingError

NOT_EXPERIMENT = (
    "paths.",
    "logger.",
    "hydra.",
    "callbacks.",
    "optuna",  # which trial of which study a job is
    "ablation.",  # labels of an arm; the switches it flips are keys of their own
    "design.",  # a factorial run's place in its design; the switches it sets are keys of their own
    "resume",
    "task_name",
    "data.root",  # where the data lies; data.fingerprint says what it is
    "data.num_workers",
    "data.cache_dir",
    "data.download",
    "data.on_device",
    "devices.channels_last",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)
MAX_PARAM_LENGTH = 6000  # MLflow 3's limit for a param value


def is_experiment_key(key: str) -> bool:
    return not any(key == entry or key.startswith(entry) for entry in NOT_EXPERIMENT)


def flatten(cfg: DictConfig | dict) -> dict[str, str]:
    """Every leaf of the resolved config as ``dotted.key -> str(value)`` (enums by their value)."""
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

    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    walk(container, "")
    return out


def experiment_params(cfg: DictConfig, fingerprint: str | None = None) -> dict[str, str]:
    """The keys that decide what a job trains and measures, with the data's fingerprint."""
    values = {k: v for k, v in flatten(cfg).items() if is_experiment_key(k)}
    if fingerprint is not None:
        values["data.fingerprint"] = fingerprint
    return values


def run_key(cfg: DictConfig, fingerprint: str | None = None) -> str:
    """A digest of everything that decides what this job trains and measures."""
    return hashlib.sha256(
        json.dumps(experiment_params(cfg, fingerprint), sort_keys=True).encode()
    ).hexdigest()[:24]


def run_name(overrides: list[str]) -> str:
    """What this job changed, e.g. ``activation=tanh seed=2``; ``default`` when nothing was overridden."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if not key.startswith("hydra") and (is_experiment_key(key) or key in ("arm", "experiment")):
            parts.append(f"{key.split('.')[-1]}={value}")
    return " ".join(parts) or "default"


def config_lock(checkpoint_dir: Path, key: str) -> FileLock:
    """Hold this while training the configuration ``key`` (``resume=auto``): a second job with the same
    config (a sweep rerun while the first still runs, two parallel trials that drew the same values) would
    write into the same run and the same last.ckpt. The OS drops the lock when its process dies, so a killed
    job can still be resumed."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(checkpoint_dir / f"{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TrackingError(
            f"A job with the same configuration (run_key {key}) is running in another process on this "
            f"machine (lock {lock.lock_file}). Wait for it to finish, or pass resume=never to train a "
            "separate run of the same configuration."
        ) from None
    return lock
