"""A user's own folder of images with the README's commands and the defaults: training from 100 images, the
validation split a tenth of each class, evaluation on the checkpoint's own data or on other images, and every
mistake one line before any MLflow run opens. The scripts run in this process (``runpy``), as a user runs
them, against a store in tmp_path."""

from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from alexnet.config import DataConfig, Dataset
from alexnet.data import AlexNetDataModule
from alexnet.errors import ConfigError, DataError
from alexnet.splits import holdout, split_indices, val_size_for

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=0.125", "trainer.max_epochs=1"]  # as experiment=smoke: a narrow net, one epoch


def image_folder(root: Path, classes: int = 10, per_class: int = 10, test: int = 3, size=(40, 30)) -> Path:
    """train/<class>/*.png and test/<class>/*.png: per_class and test images of each class, of another size
    than 32x32, each class its own brightness."""
    rng = np.random.default_rng(len(str(root)))
    for split, count in (("train", per_class), ("test", test)):
        for label in range(classes if count else 0):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size[1], size[0], 3)) + 20 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


class Store:
    """`python src/<script> overrides` in this process, against an MLflow store and folders in ``tmp``."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.uri = f"sqlite:///{tmp / 'mlflow.db'}"

    def __call__(self, script: str, *overrides: str, multirun: bool = False) -> str | int | None:
        """None when the script succeeds; else what it exits with (a person's mistake: its one line)."""
        argv = [str(ROOT / "src" / script), *(["-m"] if multirun else []),
                f"logger.tracking_uri={self.uri}", f"logger.artifact_location={self.tmp / 'mlartifacts'}",
                f"hydra.run.dir={self.tmp / 'run'}", f"hydra.sweep.dir={self.tmp / 'multirun'}",
                f"paths.checkpoint_dir={self.tmp / 'checkpoints'}", f"paths.cache_dir={self.tmp / 'cache'}",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                *overrides]  # fmt: skip
        saved = sys.argv
        sys.argv = argv
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit:
            return exit.code
        finally:
            sys.argv = saved
        return None

    def runs(self):
        if not (self.tmp / "mlflow.db").is_file():  # no store yet: nothing was opened (and none is made here)
            return []
        client = MlflowClient(self.uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(ids, order_by=["attributes.start_time ASC"]) if ids else []


def one_line(result) -> str:
    assert isinstance(result, str), f"expected a person's one-line error, got {result!r}"
    assert "\n" not in result and "Traceback" not in result
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Store, Path, Path]:
    """A 100-image folder (10 classes of 10) trained with the defaults: (its store, folder, best.ckpt)."""
    tmp = tmp_path_factory.mktemp("own")
    folder = image_folder(tmp / "images")
    store = Store(tmp)
    assert store("train.py", "data=folder", f"data.root={folder}", *TINY) is None
    (run,) = store.runs()
    return store, folder, Path(run.data.tags["checkpoint_dir"]) / "best.ckpt"


# --- 1. own data with the defaults --------------------------------------------------------------------------


def test_a_100_image_folder_trains_with_the_defaults(trained):
    store, _, best = trained
    (run,) = store.runs()
    assert run.info.status == "FINISHED" and best.is_file()
    params = run.data.params
    assert params["data.val_size"] == "None" and params["data.num_classes"] == "10"
    assert 0 <= run.data.metrics["best/val_top1_err"] <= 1 and "test/top1_err_1crop" in run.data.metrics


def test_the_readme_sweep_on_a_small_folder(tmp_path: Path, capfd):
    """`-m +ablation=lrn experiment=quick data=folder data.root=DIR` (one seed): the preset's val_size of
    2,000 (CIFAR-10's) gives way to a tenth of each class of this 60-image folder, with a warning."""
    folder = image_folder(tmp_path / "images", classes=3, per_class=20, test=2)
    store = Store(tmp_path)
    args = ["+ablation=lrn", "experiment=quick", "data=folder", f"data.root={folder}", "seed=1", *TINY]
    assert store("train.py", *args, multirun=True) is None
    runs = [r for r in store.runs() if "alexnet.sweep" not in r.data.tags]
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["data.val_size"] for r in runs} == {"None"}
    assert "data.val_size=2000 (from the config, not the command line)" in capfd.readouterr().out


def test_the_validation_split_is_a_tenth_of_each_class(tmp_path: Path):
    labels = torch.arange(10).repeat_interleave(10)  # 100 images, 10 classes
    val, train = holdout(labels, None, None, seed=0)
    assert len(val) == 10 and sorted(labels[val].tolist()) == list(range(10))  # one image of each class
    assert len(train) == 90 and not set(val.tolist()) & set(train.tolist())
    assert torch.equal(val, holdout(labels, None, None, seed=0)[0])  # seeded
    uneven = torch.tensor([0] * 5 + [1] * 26 + [2])  # a class of one image keeps it for training
    val, train = holdout(uneven, None, None, seed=0)
    assert torch.bincount(uneven[val], minlength=3).tolist() == [1, 3, 0] and len(train) == 28
    assert len(holdout(labels, None, 40, seed=0)[1]) == 40  # data.train_size still a subset of the rest
    # A number is held out exactly as before (the same images as every run so far).
    exact, before = holdout(labels, 7, None, 3), split_indices(100, 7, None, 3)
    assert all(torch.equal(a, b) for a, b in zip(exact, before, strict=True))
    big = image_folder(tmp_path / "big", classes=3, per_class=40, test=2)
    dm = AlexNetDataModule(DataConfig(dataset=Dataset.folder, root=str(big), num_classes=None, val_size=None))
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (108, 12)
    assert torch.bincount(dm.val_set.labels).tolist() == [4, 4, 4]


def test_what_data_val_size_a_data_set_takes(caplog):
    cfg = DataConfig(dataset=Dataset.folder, root="/d", num_classes=None, val_size=None)
    assert val_size_for(cfg, [10] * 10, given=False) is None
    with pytest.raises(DataError, match="single image"):
        val_size_for(cfg, [1, 1], given=False)
    cfg.val_size = 1000
    with pytest.raises(ConfigError) as err:  # given on the command line: exact, and one line if it cannot be
        val_size_for(cfg, [10] * 10, given=True)
    assert str(err.value).startswith("data.val_size=1000 is not allowed: /d/train holds 100 training images")
    assert val_size_for(cfg, [10] * 10, given=False) is None  # from a preset: gives way
    cfg.val_size = 50
    assert val_size_for(cfg, [10] * 10, given=True) == 50
    # The presets on CIFAR-10's 50,000 images keep their numbers (cpu: 5000, quick: 2000, the default 5000).
    for size in (5000, 2000):
        cfg.val_size = size
        assert val_size_for(cfg, [5000] * 10, given=False) == size


# --- 2. eval.py evaluates what it is given ------------------------------------------------------------------


def test_eval_tests_the_checkpoint_on_its_own_data_without_its_training_images(trained, tmp_path: Path):
    """No data on the command line (nor experiment=): the data the checkpoint was trained on, here moved to a
    folder that holds its test split alone. Only that split is read, and the numbers are the training's."""
    store, folder, best = trained
    moved = tmp_path / "images"
    shutil.copytree(folder / "test", moved / "test")
    ckpt = torch.load(best, weights_only=True)
    ckpt["alexnet"]["config"]["data"]["root"] = str(moved)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    assert store("eval.py", f"ckpt_path={tmp_path / 'moved.ckpt'}") is None
    run = store.runs()[0]  # the checkpoint's own run
    assert run.data.tags["eval.data"] == f"folder {moved}"
    for views in ("1crop", "10crop"):
        test, evaluated = (
            run.data.metrics[f"test/top1_err_{views}"],
            run.data.metrics[f"eval/top1_err_{views}"],
        )
        assert evaluated == pytest.approx(test, abs=1e-6)


def test_eval_on_other_images_of_the_same_classes(trained, tmp_path: Path):
    store, _, best = trained
    other = image_folder(tmp_path / "other", per_class=0, test=2)  # a test split alone
    assert store("eval.py", f"ckpt_path={best}", "data=folder", f"data.root={other}") is None
    run = store.runs()[0]
    assert run.data.tags["eval.data"] == f"folder {other}" and "eval/top1_err_10crop" in run.data.metrics


def test_eval_on_another_number_of_classes_or_without_a_checkpoint_is_one_line(trained, tmp_path: Path):
    store, _, best = trained
    before = len(store.runs())
    three = image_folder(tmp_path / "three", classes=3, per_class=0, test=2)
    line = one_line(store("eval.py", f"ckpt_path={best}", "data=folder", f"data.root={three}"))
    assert line.startswith("Data error:") and "has 10 classes but the data" in line and "has 3" in line
    line = one_line(store("eval.py"))
    assert line.startswith("Config error: ckpt_path is not set") and "ckpt_path=checkpoints/" in line
    assert len(store.runs()) == before


# --- 3. every mistake one line, before any run opens --------------------------------------------------------


def _corrupt(folder: Path) -> str:
    bad = folder / "train" / "class3" / "4.png"
    bad.write_bytes(b"<html>not an image</html>")
    return f"Data error: Cannot decode image {bad}: "


def _empty(folder: Path) -> str:
    bad = folder / "test" / "class1" / "0.png"
    bad.write_bytes(b"")
    return f"Data error: Cannot decode image {bad}: the file is empty"


MISTAKES = {
    "corrupt image": (_corrupt, ["data=folder"]),
    "empty image": (_empty, ["data=folder"]),
    "not CIFAR-10's size": (lambda folder: "data=folder data.root=", []),
    "val_size too large": (
        lambda folder: "data.val_size=100 is not allowed",
        ["data=folder", "data.val_size=100"],
    ),
    "trainer.devices": (
        lambda folder: "Config error: trainer.devices=4",
        ["data=folder", "trainer.devices=4"],
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_data_mistake_is_one_line_and_leaves_no_run(trained, tmp_path: Path, mistake: str):
    store = trained[0]  # a store that exists, read back with MlflowClient
    before = [r.info.run_id for r in store.runs()]
    damage, overrides = MISTAKES[mistake]
    folder = image_folder(tmp_path / "images", test=1)
    expected = damage(folder)
    assert expected in one_line(store("train.py", f"data.root={folder}", *overrides, *TINY))
    assert [r.info.run_id for r in store.runs()] == before


NO_GPU = [
    ["trainer.accelerator=gpu"],
    ["trainer.accelerator=cuda"],
    ["devices=model_parallel", "trainer.accelerator=gpu"],
    ["devices=ddp", "devices.count=2", "trainer.accelerator=gpu"],
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("overrides", NO_GPU)
def test_a_gpu_the_machine_does_not_have_is_one_line(trained, overrides: list[str]):
    store, _, best = trained
    before = len(store.runs())
    for script, extra in (("train.py", ["experiment=smoke"]), ("eval.py", [f"ckpt_path={best}"])):
        line = one_line(store(script, *extra, *overrides))
        assert line.startswith("Config error: trainer.accelerator=") and "has no" in line and "cpu" in line
    assert len(store.runs()) == before


def test_more_gpus_than_the_machine_has_is_one_line(trained, monkeypatch):
    from lightning.pytorch.accelerators import CUDAAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: 1))
    store = trained[0]
    before = len(store.runs())
    args = ["experiment=smoke", "devices=ddp", "devices.count=4", "trainer.accelerator=gpu"]
    line = one_line(store("train.py", *args))
    assert line.startswith("Config error: devices.count=4 is not allowed") and "has 1" in line
    assert len(store.runs()) == before
