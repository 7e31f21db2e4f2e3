"""What a new user meets in the first hour: their own images, one-line errors, evaluating a checkpoint,
sweeps nested in the MLflow UI, and runs that are found again after the data moved."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet.identity import NOT_EXPERIMENT

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=0.125", "trainer.max_epochs=1", "data.batch_size=16", "data.val_size=8"]


def image_folder(root: Path, size=(28, 28), mode="L", classes=("ant", "bee", "cat"), per_class=12,
                 test_split="test", mixed=False) -> Path:  # fmt: skip
    """A user's own ImageFolder tree of generated images: each class a different brightness pattern."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), (test_split, per_class // 2)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(rng.integers(20, 60)), int(rng.integers(20, 60))) if mixed else size
                pixels = rng.integers(0, 80, (h, w, 3)) + 80 * label
                img = Image.fromarray(pixels.astype(np.uint8)).convert("L" if mixed and i % 2 else mode)
                img.save(folder / f"{i}.{'png' if i % 3 else 'jpg'}")
    return root


def test_own_28x28_grayscale_images_train_with_data_folder(train_run, tmp_path: Path):
    """Grayscale 28x28 images (an MNIST-like set): resized to the network's 32x32 input, classes counted from
    the folders; the run finishes and is tested on the test/ folder."""
    root = image_folder(tmp_path / "mine")
    train_run("data=folder", f"data.root={root}", *TINY)
    (run,) = train_run.runs()
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["data.num_classes"], params["model.num_classes"], params["model.input_size"]) == (
        "3",
        "3",
        "32",
    )
    assert params["data.test_split"] == "test" and 0 <= run.data.metrics["test/top1_err_1crop"] <= 1


def test_own_images_of_mixed_sizes_and_modes_with_a_val_folder(train_run, tmp_path: Path):
    root = image_folder(tmp_path / "mixed", mixed=True, test_split="val", classes=("a", "b"))
    train_run("data=folder", f"data.root={root}", *TINY)
    (run,) = train_run.runs()
    assert run.info.status == "FINISHED"
    assert run.data.params["data.test_split"] == "val" and run.data.params["model.num_classes"] == "2"


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    return output


def test_images_the_chosen_data_set_cannot_take_are_named_with_the_setting_to_change(
    train_run, tmp_path: Path
):
    """28x28 images given to data=cifar10 (the default): one line that says to use data=folder, before any
    training."""
    root = image_folder(tmp_path / "mnistish")
    output = one_line_error(train_run(f"data.root={root}", *TINY, check=False))
    assert "28x28" in output and "data=folder" in output
    assert "Epoch" not in output


def test_missing_data_and_unreadable_images_are_one_line(train_run, tmp_path: Path):
    output = one_line_error(train_run(f"data.root={tmp_path / 'nowhere'}", *TINY, check=False))
    assert "Data error: CIFAR-10 not found under" in output and str(tmp_path / "nowhere") in output
    assert train_run.runs() == []  # nothing was opened for a mistake found up front
    root = image_folder(tmp_path / "broken")
    bad = root / "train" / "bee" / "4.png"
    bad.write_bytes(b"not an image at all")
    output = one_line_error(train_run("data=folder", f"data.root={root}", *TINY, check=False))
    assert f"Cannot decode image {bad}" in output


def test_eval_tests_a_checkpoint_into_its_own_run_or_a_new_one(train_run, tmp_path: Path):
    train_run("experiment=smoke")
    (run,) = train_run.runs()
    best = Path(run.data.tags["checkpoint_dir"]) / "best.ckpt"
    args, env = train_run.command(f"ckpt_path={best}", "experiment=smoke")
    args[1] = str(ROOT / "src" / "eval.py")
    proc = subprocess.run(args, cwd=train_run.tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = train_run.runs()  # the checkpoint's own run, no new one
    metrics = again.data.metrics
    for views in ("1crop", "10crop"):  # the checkpoint the training tested: the same numbers
        assert metrics[f"eval/top1_err_{views}"] == pytest.approx(metrics[f"test/top1_err_{views}"], abs=1e-6)
    assert again.data.tags["eval.checkpoint"] == str(best)
    assert "eval/test_outcomes.npz" in {
        a.path for a in train_run.client.list_artifacts(run.info.run_id, "eval")
    }

    # A checkpoint from elsewhere (another store): a new run, which records what it tested.
    moved = tmp_path / "elsewhere.ckpt"
    shutil.copy(best, moved)
    other = type(train_run)(tmp_path / "other")
    other.tmp.mkdir(exist_ok=True)
    args, env = other.command(f"ckpt_path={moved}", "experiment=smoke")
    args[1] = str(ROOT / "src" / "eval.py")
    proc = subprocess.run(args, cwd=other.tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (new,) = other.runs()
    assert new.data.tags["eval.of"] == str(moved) and "eval/top1_err_10crop" in new.data.metrics


def test_a_sweep_is_one_parent_run_with_its_jobs_nested_across_processes_and_reruns(train_run):
    """Two jobs in two joblib worker processes: one parent run; rerunning the same sweep (which trains
    nothing new) finds that parent instead of making a second one."""
    sweep = ["experiment=smoke", "seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    train_run(*sweep, multirun=True)
    # another sweep (in this process: the launcher is not the point here): its own parent, seed 3 under it
    train_run("experiment=smoke", "seed=1,2,3", multirun=True)
    runs = train_run.runs(parents=True)
    parents = [r for r in runs if "alexnet.sweep" in r.data.tags]
    children = [r for r in runs if "alexnet.sweep" not in r.data.tags]
    assert len(parents) == 2 and len(children) == 3
    first = next(p for p in parents if "seed=1,2 " in p.info.run_name + " ")
    nested = {c.data.tags["seed"]: c.data.tags["mlflow.parentRunId"] for c in children}
    assert nested["1"] == nested["2"] == first.info.run_id and nested["3"] != first.info.run_id
    train_run(*sweep, multirun=True)  # the same command again
    assert len([r for r in train_run.runs(parents=True) if "alexnet.sweep" in r.data.tags]) == 2


def test_a_moved_data_folder_is_the_same_data(train_run, tmp_path: Path):
    """The run key names what the data is (its files and sizes), not where it lies: after the folder moves,
    the same command finds the finished run instead of training again."""
    first = image_folder(tmp_path / "here")
    train_run("data=folder", f"data.root={first}", *TINY)
    moved = first.rename(tmp_path / "there")
    proc = train_run("data=folder", f"data.root={moved}", *TINY)
    assert "not training it again" in proc.stdout + proc.stderr
    (extra := moved / "train" / "ant" / "new.png").write_bytes(
        (moved / "train" / "ant" / "1.png").read_bytes()
    )
    train_run("data=folder", f"data.root={moved}", *TINY)  # other data now: a new run
    assert len(train_run.runs()) == 2 and extra.is_file()
    assert "data.root" in NOT_EXPERIMENT


def test_the_quick_start_main_job_is_one_claim_and_its_report(compose_cfg):
    """The README's main job: +ablation=lrn at experiment=quick, then its report. Composed here; timed in the
    README (about 15 minutes on 2 cores)."""
    readme = (ROOT / "README.md").read_text()
    assert "python src/train.py -m +ablation=lrn experiment=quick" in readme
    assert "python src/report.py ablation_quick" in readme
    cfg = compose_cfg("experiment=quick", "+ablation=lrn")
    assert cfg.logger.experiment_name == "ablation_quick" and cfg.trainer.max_epochs == 5
