"""Training end to end, as a user runs it, with every run read back from MLflow with its client."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from alexnet.model import AlexNet
from alexnet.module import AlexNetModule

# A few hundred real CIFAR-10 images through a narrow net: seconds, not minutes.
SMALL_CIFAR = [
    "data.train_size=384",
    "data.val_size=128",
    "data.test_size=128",
    "data.batch_size=64",
    "model.width=0.25",
    "trainer.max_epochs=2",
]


def test_training_run_is_tracked_in_mlflow(train_run, cifar10_root: Path):
    train_run(*SMALL_CIFAR, "model.activation=tanh", "model.lrn=false", "seed=3")
    (run,) = train_run.runs()
    assert run.info.status == "FINISHED"
    assert (
        run.info.run_name
        == "train_size=384 val_size=128 test_size=128 batch_size=64 width=0.25 max_epochs=2 "
        "activation=tanh lrn=false seed=3"
    )
    params = run.data.params
    # Every resolved config value, under its dotted key.
    assert params["model.activation"] == "tanh" and params["model.lrn"] == "False"
    assert params["model.pool"] == "overlapping" and params["model.columns"] == "2"
    assert params["optimizer.lr"] == "0.01" and params["optimizer.momentum"] == "0.9"
    # What the data is, not where it lies (alexnet.identity): the path is in the run's config.yaml only.
    assert "data.root" not in params and params["data.fingerprint"] and params["seed"] == "3"
    assert params["trainer.max_epochs"] == "2"
    tags = run.data.tags
    assert tags["seed"] == "3" and tags["hydra_job_num"] == "0"
    assert len(tags["git_commit"]) >= 7
    metrics = run.data.metrics
    for key in (
        "train/loss",
        "train/top1_err",
        "train/top5_err",
        "val/loss",
        "val/top1_err",
        "val/top5_err",
        "val/top1_err_best",
        "train/images_per_sec",
        "lr-SGD",
        "best/val_top1_err",
        "final/train_top1_err",
        "test/top1_err_1crop",
        "test/top5_err_1crop",
        "test/top1_err_10crop",
        "test/top5_err_10crop",
    ):
        assert key in metrics, key
    for key in ("train/top1_err", "val/top1_err", "test/top1_err_1crop", "test/top1_err_10crop"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["val/top5_err"] <= metrics["val/top1_err"]
    assert metrics["train/images_per_sec"] > 0
    history = train_run.client.get_metric_history(run.info.run_id, "val/top1_err")
    assert len(history) == 2  # one point per epoch
    assert metrics["best/val_top1_err"] == pytest.approx(min(m.value for m in history))
    # Never reached 25% training error in two epochs: said so, not left blank.
    assert tags["epochs_to_target"] == "never"
    artifacts = {a.path for a in train_run.client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml"} <= artifacts
    config = Path(train_run.client.download_artifacts(run.info.run_id, "config.yaml")).read_text()
    assert "activation: tanh" in config


def test_multirun_lands_in_one_experiment(train_run, cifar10_root: Path):
    train_run(*SMALL_CIFAR, "trainer.max_epochs=1", "model.activation=relu,sigmoid", multirun=True)
    runs = train_run.runs()
    assert len(runs) == 2
    assert {r.info.experiment_id for r in runs} == {runs[0].info.experiment_id}
    assert sorted(r.data.params["model.activation"] for r in runs) == ["relu", "sigmoid"]
    assert sorted(r.data.tags["hydra_job_num"] for r in runs) == ["0", "1"]
    assert all(r.data.tags["sweep_dir"] == str(train_run.tmp / "multirun") for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert any("activation=sigmoid" in r.info.run_name for r in runs)


def test_time_to_target_on_learnable_data(train_run):
    """Synthetic data the net learns in a few epochs: the target crossing is found and logged."""
    no_augmentation = ("data.crops=false", "data.flips=false", "data.pca_color=false")
    train_run(
        "experiment=smoke",
        "trainer.max_epochs=4",
        "target_train_error=0.5",
        "model.width=0.25",
        *no_augmentation,
    )
    (run,) = train_run.runs()
    metrics = run.data.metrics
    assert "final/epochs_to_target" in metrics and 0 < metrics["final/epochs_to_target"] <= 4
    assert metrics["final/seconds_to_target"] > 0
    assert "epochs_to_target" not in run.data.tags


def test_figure1_net_stops_at_the_target(train_run):
    """Figure 1's protocol: the four-layer net, trained until it reaches the target error and no further."""
    train_run(
        "experiment=smoke",
        "model=figure1_cnn",
        "trainer.max_epochs=8",
        "target_train_error=0.5",
        "stop_at_target=true",
        "data.crops=false",
        "data.flips=false",
        "data.pca_color=false",
        "optimizer.weight_decay=0",
    )
    (run,) = train_run.runs()
    assert run.data.params["model.arch"] == "figure1_cnn"
    reached = run.data.metrics["final/epochs_to_target"]
    epochs = len(train_run.client.get_metric_history(run.info.run_id, "train/top1_err"))
    assert epochs == math.ceil(reached) < 8  # stopped at the epoch that crossed 50%


def test_missing_data_fails_in_one_line_before_a_run_is_created(train_run, tmp_path: Path):
    """A job that fails while training is recorded FAILED with its error (tests/test_robustness.py's chaos
    sweep); data that is not there is the user's to fix, and is found before anything is tracked."""
    missing = tmp_path / "no-such-data"
    proc = train_run("data.train_size=64", f"data.root={missing}", "trainer.max_epochs=1", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert str(missing) in output and "Traceback" not in output
    assert train_run.runs() == []


def test_time_to_target_interpolates_between_epochs():
    module = AlexNetModule(
        AlexNet(num_classes=10, input_size=32, width=0.125), num_classes=10, target_train_error=0.25
    )
    module.train_curve += [(1.0, 0.5, 10.0)]
    assert not module._check_target() and module.epochs_to_target is None
    module.train_curve += [(2.0, 0.2, 20.0)]
    assert module._check_target()
    assert module.epochs_to_target == pytest.approx(1 + (0.5 - 0.25) / (0.5 - 0.2))
    assert module.seconds_to_target == pytest.approx(10 + 10 * (0.25 / 0.3))
    # A target at or above chance error (0.9 for 10 classes) counts as reached at the start, never before.
    easy = AlexNetModule(
        AlexNet(num_classes=10, input_size=32, width=0.125), num_classes=10, target_train_error=0.95
    )
    easy.train_curve += [(1.0, 0.85, 10.0)]
    assert easy._check_target() and easy.epochs_to_target == 0.0


def test_paper_recipe_optimizer():
    module = AlexNetModule(AlexNet(num_classes=10, input_size=32, width=0.125), num_classes=10)
    config = module.configure_optimizers()
    sgd = config["optimizer"]
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 5e-4)
    plateau = config["lr_scheduler"]["scheduler"]
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau.factor == 0.1 and config["lr_scheduler"]["monitor"] == "val/top1_err"
    assert math.isclose(plateau.min_lrs[0], 1e-5)


def test_http_tracking_server(train_run, tmp_path: Path):
    """An `http://` tracking URI works unchanged: a real `mlflow server` on localhost receives the run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("mlflow server did not start") from None
                time.sleep(0.5)
        train_run.tracking_uri, train_run.client = uri, MlflowClient(uri)
        train_run("experiment=smoke")
        (run,) = train_run.runs()
        assert run.info.status == "FINISHED" and "val/top1_err" in run.data.metrics
        assert "config.yaml" in {a.path for a in train_run.client.list_artifacts(run.info.run_id)}
        assert list((tmp_path / "server-artifacts").rglob("config.yaml"))  # stored by the server
    finally:
        server.terminate()
        server.wait(timeout=30)
