"""Shared fixtures: the real config composed with Hydra's compose API, the real CIFAR-10 beside the project,
`python src/train.py` run as a user runs it against a temporary MLflow store, and a job killed mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

import alexnet.config  # noqa: F401 - registers the config schemas with Hydra before any test composes

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
# The real data set every developer and CI has beside the checkout (ImageFolder layout, JPEG files): the
# folder that holds cifar10/, as for src/train.py.
SHARED_DATA = Path(os.environ.get("ALEXNET_DATA_DIR", ROOT.parent / "shared" / "data"))
CIFAR10 = SHARED_DATA / "cifar10"

os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# pytest-xdist's workers share the cores (pyproject's addopts: -n auto): each worker, and every train.py its
# tests start (they inherit the environment), takes its share of the threads, not all of them, which would
# have the workers' thread pools fight over the same cores.
if _workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(_workers))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def cifar10_root() -> Path:
    if not (CIFAR10 / "train").is_dir():
        message = (
            f"real CIFAR-10 not found at {CIFAR10} (set ALEXNET_DATA_DIR to the folder holding cifar10/)"
        )
        if os.environ.get("ALEXNET_REQUIRE_DATA"):  # CI: a missing data set must fail, not skip quietly
            pytest.fail(message)
        pytest.skip(message)
    return CIFAR10


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the `train` config as `python src/train.py overrides` composes it."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


class TrainRun:
    """`python src/train.py ...` in a subprocess, with its MLflow store and outputs inside tmp_path."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.client = MlflowClient(self.tracking_uri)

    def base_overrides(self) -> list[str]:
        return [
            f"logger.tracking_uri={self.tracking_uri}",
            f"logger.artifact_location={self.tmp / 'mlartifacts'}",
            f"hydra.run.dir={self.tmp / 'run'}",
            f"hydra.sweep.dir={self.tmp / 'multirun'}",
            f"paths.checkpoint_dir={self.tmp / 'checkpoints'}",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ]

    def command(self, *overrides: str, multirun: bool = False) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of `python src/train.py [-m] overrides` for this store."""
        args = (
            [sys.executable, str(TRAIN)]
            + (["-m"] if multirun else [])
            + self.base_overrides()
            + list(overrides)
        )
        env = {**os.environ, "ALEXNET_DATA_DIR": str(SHARED_DATA), "PYTHONWARNINGS": "ignore"}
        env.pop("MLFLOW_TRACKING_URI", None)
        return args, env

    def __call__(self, *overrides: str, multirun: bool = False, check: bool = True, timeout: int = 600):
        args, env = self.command(*overrides, multirun=multirun)
        proc = subprocess.run(args, cwd=self.tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
            )
        return proc

    def runs(self, experiment: str | None = None, parents: bool = False):
        """The training runs of ``experiment`` (default: every experiment of this store), oldest first;
        with ``parents``, also the sweeps' parent runs."""
        exps = (
            [self.client.get_experiment_by_name(experiment)]
            if experiment
            else self.client.search_experiments()
        )
        ids = [e.experiment_id for e in exps if e is not None]
        if not ids:
            return []
        runs = self.client.search_runs(ids, order_by=["attributes.start_time ASC"])
        return [r for r in runs if parents or "alexnet.sweep" not in r.data.tags]

    def start(self, *overrides: str, multirun: bool = False) -> subprocess.Popen:
        """train.py in the background, in its own process group (so that a kill takes all its processes)."""
        args, env = self.command(*overrides, multirun=multirun)
        quiet = subprocess.DEVNULL
        return subprocess.Popen(
            args, cwd=self.tmp, env=env, stdout=quiet, stderr=quiet, start_new_session=True
        )

    def kill_after_first_checkpoint(
        self, proc: subprocess.Popen, run_filter=None, timeout: float = 400
    ) -> None:
        """SIGKILL the whole job as soon as one epoch of a run (the first that ``run_filter`` accepts) is
        checkpointed: the next epoch is then under way."""
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            runs = [r for r in self.runs() if run_filter is None or run_filter(r)]
            if runs and (self.tmp / "checkpoints" / runs[0].info.run_id / "last.ckpt").is_file():
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def train_run(tmp_path: Path) -> TrainRun:
    return TrainRun(tmp_path)


@contextmanager
def scratch(prefix: str, mode: int = 0o711) -> Iterator[Path]:
    """A short temporary folder that other users can reach (PostgreSQL's user; munged's socket with 0o755):
    pytest's tmp_path is closed to them, and too long for a socket path."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(home, mode)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)
