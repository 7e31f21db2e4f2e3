"""Runs and sweeps that survive: kill and resume, a rerun sweep, parallel writers, bad data, bad trackers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.config import DataConfig, Dataset
from alexnet.data import AlexNetDataModule, DataNotFoundError
from alexnet.errors import DataError

# Synthetic data, a narrow net, a few epochs of a few seconds each.
SMALL = ["experiment=smoke", "model.width=0.25", "data.synthetic_size=1024", "trainer.max_epochs=4"]
SUMMARY = ("best/val_top1_err", "best/val_top5_err", "final/train_top1_err", "test/top1_err_1crop")


def curve(store, run, key: str) -> set[tuple[int, float]]:
    """A metric's history as (step, value) points; a point logged again after a resume counts once."""
    return {(m.step, round(m.value, 6)) for m in store.client.get_metric_history(run.info.run_id, key)}


def test_killed_job_resumes_into_the_same_run_with_the_same_result(train_run, tmp_path: Path):
    # patience 0: the schedule drops the learning rate whenever validation error does not improve, so a
    # resume that lost a schedule step would show in the lr-SGD curve.
    job = (*SMALL, "optimizer.plateau_patience=0")
    reference = type(train_run)(tmp_path / "uninterrupted")
    reference.tmp.mkdir(exist_ok=True)
    reference(*job)
    (expected,) = reference.runs()

    train_run.kill_after_first_checkpoint(train_run.start(*job))
    (killed,) = train_run.runs()
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to say goodbye
    train_run(*job)  # the same command again

    (run,) = train_run.runs()  # no duplicate run
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["attempts"] == "2" and run.data.tags["resumed_from"].endswith("last.ckpt")
    history = train_run.client.get_metric_history(run.info.run_id, "val/top1_err")
    assert len({m.step for m in history}) == 4  # one continuous curve, one point per epoch
    for key in SUMMARY:
        assert run.data.metrics[key] == pytest.approx(expected.data.metrics[key], abs=1e-6), key
    for key in ("lr-SGD", "val/top1_err", "train/top1_err", "train/loss"):
        assert curve(train_run, run, key) == curve(reference, expected, key), key


def test_rerunning_a_finished_job_trains_nothing(train_run, compose_cfg):
    """A finished config is not trained again; resume=never trains a second run even while a live job of
    the config holds its lock; smoke runs go to their own experiment; last.ckpt is written every epoch."""
    from filelock import FileLock

    from alexnet.identity import run_key

    # A rate too small to change an error: only the first epoch makes a new best.ckpt.
    job = ("experiment=smoke", "trainer.max_epochs=2", "optimizer.lr=1e-12", "optimizer.min_lr=0")
    train_run(*job)
    (run,) = train_run.runs()
    assert len(train_run.runs("smoke")) == 1 and train_run.runs("alexnet") == []
    folder = train_run.tmp / "checkpoints" / run.info.run_id
    epoch = {f: torch.load(folder / f, weights_only=True)["epoch"] for f in ("best.ckpt", "last.ckpt")}
    assert epoch == {"best.ckpt": 0, "last.ckpt": 1}  # last.ckpt every epoch, for a resume to lose none
    proc = train_run(*job)
    assert "not training it again" in proc.stdout + proc.stderr
    assert len(train_run.runs()) == 1
    key = run_key(compose_cfg(*job), "synthetic")
    with FileLock(train_run.tmp / "checkpoints" / f"{key}.lock"):  # as a running job of this config holds it
        train_run(*job, "resume=never")
    assert [r.info.status for r in train_run.runs()] == ["FINISHED", "FINISHED"]


@pytest.mark.slow  # two training processes at once: a stress test (nox -s slow)
def test_parallel_jobs_share_one_sqlite_store(train_run):
    """4 processes (hydra-joblib-launcher) write to one new SQLite file at once: every run, every metric."""
    train_run(
        "experiment=smoke", "trainer.max_epochs=2", "seed=1,2,3,4", "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4", multirun=True,
    )  # fmt: skip
    runs = train_run.runs()
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2", "3", "4"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        for key in ("train/top1_err", "val/top1_err", "lr-SGD"):
            assert len(train_run.client.get_metric_history(r.info.run_id, key)) == 2, key
        assert "test/top1_err_10crop" in r.data.metrics


def case(run) -> str:
    """The chaos case of a run: its experiment= override."""
    return next(o.split("=")[1] for o in run.data.tags["overrides"].split() if o.startswith("experiment="))


@pytest.mark.slow  # four failure modes in one sweep; each also has a default test of its own
def test_chaos_sweep(train_run, tmp_path: Path):
    """One job finishes, one raises, one diverges, one is killed; the sweep is rerun until all is settled."""
    conf = tmp_path / "chaos_conf" / "experiment"
    conf.mkdir(parents=True)
    cases = {
        "chaos_ok": "seed: 1",
        "chaos_raise": "seed: -1",  # fails at run time: numpy takes no negative seed
        "chaos_diverge": "optimizer:\n  lr: 1.0e12",
        "chaos_killed": "seed: 2\ntrainer:\n  max_epochs: 6",
    }
    for name, body in cases.items():
        header = f"# @package _global_\ndefaults:\n  - smoke\n  - _self_\ntask_name: {name}\n"
        (conf / f"{name}.yaml").write_text(header + body + "\n")
    sweep = [
        f"hydra.searchpath=[file://{tmp_path / 'chaos_conf'}]",
        "experiment=chaos_ok,chaos_raise,chaos_diverge,chaos_killed",
        "model.width=0.25",
        "data.synthetic_size=1024",
    ]
    proc = train_run.start(*sweep, multirun=True)
    train_run.kill_after_first_checkpoint(proc, lambda r: case(r) == "chaos_killed")
    rerun = train_run(*sweep, multirun=True, check=False)
    assert rerun.returncode != 0  # the raising job still raises, and the sweep says so at the end
    by_case = {case(r): r for r in train_run.runs()}
    assert len(train_run.runs()) == 4  # exactly one run per job
    status = {name: (r.info.status, r.data.tags.get("attempts")) for name, r in by_case.items()}
    assert status == {
        "chaos_ok": ("FINISHED", "1"),  # not trained again
        "chaos_raise": ("FAILED", "2"),
        "chaos_diverge": ("FAILED", "1"),  # a result, not an accident: not retried
        "chaos_killed": ("FINISHED", "2"),
    }
    assert "is not in bounds" in by_case["chaos_raise"].data.tags["error"]
    diverged = by_case["chaos_diverge"].data.tags
    assert diverged["diverged"] == "true" and "training loss became" in diverged["error"]
    history = train_run.client.get_metric_history(by_case["chaos_killed"].info.run_id, "val/top1_err")
    assert len({m.step for m in history}) == 6


# --- bad data -----------------------------------------------------------------------------------------


def image_folder(root: Path, per_class: int = 4, classes=("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.jpg"
                )
    return root


def folder_module(root: Path) -> AlexNetDataModule:
    cfg = DataConfig(dataset=Dataset.cifar10, root=str(root), num_classes=2, val_size=2, batch_size=4)
    dm = AlexNetDataModule(cfg)
    dm.setup()
    return dm


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_unreadable_image_is_named(tmp_path: Path, damage: str):
    root = image_folder(tmp_path)
    bad = root / "train" / "b" / "2.jpg"
    data = bad.read_bytes()
    bad.write_bytes(b"this is not a JPEG" * 10 if damage == "corrupt" else data[: len(data) // 3])
    with pytest.raises(DataError) as err:
        folder_module(root)
    message = str(err.value)
    assert str(bad) in message and "Replace or delete the file" in message and ".cpp" not in message


def test_grayscale_and_rgba_files_become_rgb(tmp_path: Path):
    root = image_folder(tmp_path)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(
        root / "train" / "a" / "gray.png"
    )
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), mode="RGBA").save(
        root / "train" / "b" / "rgba.png"
    )
    dm = folder_module(root)
    assert len(dm.train_set) + len(dm.val_set) == 10
    assert dm.train_set.images.shape[1:] == (3, 32, 32)


def test_empty_class_folder_is_named(tmp_path: Path):
    root = image_folder(tmp_path)
    (root / "train" / "c").mkdir()
    with pytest.raises(DataNotFoundError, match=str(root / "train" / "c")):
        folder_module(root)


def test_missing_split_folder_is_named(tmp_path: Path):
    root = image_folder(tmp_path)
    for f in (root / "test" / "a").iterdir():
        f.unlink()
    (root / "test" / "a").rmdir()
    (root / "test" / "b").rename(root / "elsewhere")
    (root / "test").rmdir()
    with pytest.raises(DataNotFoundError, match=f"No folder {root / 'test'} \\(the 'test' split\\)"):
        folder_module(root)


# --- tracking failures -----------------------------------------------------------------------------------


def test_unreachable_tracking_server_fails_before_training(train_run):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    begin = time.monotonic()
    proc = train_run(
        "experiment=smoke", f"logger.tracking_uri=http://127.0.0.1:{port}", check=False, timeout=120
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"Cannot reach the MLflow tracking server at http://127.0.0.1:{port}" in output
    # MLflow's own retries would take minutes (7 with backoff); 100 s leaves room for a loaded machine's
    # start-up (over 60 s at a load of 20).
    assert "Epoch" not in output and time.monotonic() - begin < 100


def test_unwritable_artifact_location_is_reported(train_run, tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    proc = train_run("experiment=smoke", f"logger.artifact_location={blocker / 'artifacts'}", check=False)
    assert proc.returncode != 0
    assert "Cannot record run" in proc.stdout + proc.stderr
    (run,) = train_run.runs()
    assert run.info.status == "FAILED" and "Cannot record run" in run.data.tags["error"]


def test_a_second_live_job_with_the_same_config_is_refused(train_run, compose_cfg):
    """Two live processes must never write into one run and one last.ckpt: the second is skipped at once (one
    line; a sweep goes on with its other jobs)."""
    from filelock import FileLock

    from alexnet.identity import run_key

    key = run_key(compose_cfg("experiment=smoke"), "synthetic")  # what the subprocess computes
    with FileLock(train_run.tmp / "checkpoints" / f"{key}.lock"):  # as a running job holds it
        proc = train_run("experiment=smoke", check=False)
    assert proc.returncode == 0 and not train_run.runs()
    assert "Skipped: A job with the same configuration" in proc.stdout + proc.stderr
    train_run("experiment=smoke")  # once the other job is gone, the same command trains
    assert [r.info.status for r in train_run.runs()] == ["FINISHED"]
