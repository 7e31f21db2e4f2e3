"""One device or two: the two-device net computes the grouped net's function, Lightning keeps its columns
where they belong, the devices switch is checked up front, a DDP job is one MLflow run with exact metrics,
and the speed benchmark runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import lightning.pytorch.strategies.strategy as lightning_strategy
import pytest
import torch
from hydra.errors import ConfigCompositionException
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

import alexnet.devices as devices_module
from alexnet import ddp
from alexnet.config import CheckedConfig, ConfigError, DataConfig, Dataset, check_config
from alexnet.data import AlexNetDataModule
from alexnet.devices import ColumnParallelStrategy, TwoDeviceAlexNet, keep_state_with_parameters, placement
from alexnet.identity import run_key
from alexnet.model import AlexNet, build_network
from alexnet.module import AlexNetModule

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def grouped_grads(split: TwoDeviceAlexNet, grouped: AlexNet) -> dict[str, torch.Tensor]:
    """The split net's gradients in the grouped net's layout (column A's half first, as its channels)."""
    grads = {}
    for name, _ in grouped.named_parameters():
        _, layer, kind = name.split(".")
        if layer == "fc8":
            grads[name] = getattr(split.fc8, kind).grad
        else:
            halves = [getattr(col.layers[layer], kind).grad for col in (split.column_a, split.column_b)]
            grads[name] = torch.cat(halves)
    return grads


SPLIT_CASES = [
    ("overlapping", None),
    ("non_overlapping", None),
    ("overlapping", "conv3"),
    ("overlapping", "conv5"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_size", [32, 227])
@pytest.mark.parametrize(("pool", "removed"), SPLIT_CASES)
def test_two_devices_compute_the_grouped_function(dtype: torch.dtype, input_size: int, pool: str, removed):
    """Same weights, same outputs and same gradients (of the weights and of the input), LRN on; also without
    conv3 (the columns then cross only at the FC layers) or conv5."""
    torch.manual_seed(0)
    grouped = AlexNet(
        num_classes=10,
        input_size=input_size,
        pool=pool,
        lrn=True,
        dropout=0.0,
        width=0.125,
        removed_conv=removed,
    ).to(dtype)
    split = TwoDeviceAlexNet(grouped, devices=("cpu", "cpu"))
    x = torch.randn(2, 3, input_size, input_size, dtype=dtype)
    labels = torch.tensor([1, 9])
    outputs, inputs = {}, {}
    for name, net in (("grouped", grouped), ("split", split)):
        inputs[name] = x.clone().requires_grad_()
        outputs[name] = net(inputs[name])
        nn.functional.cross_entropy(outputs[name], labels).backward()
    torch.testing.assert_close(outputs["split"], outputs["grouped"], **TOLERANCE[dtype])
    torch.testing.assert_close(inputs["split"].grad, inputs["grouped"].grad, **TOLERANCE[dtype])
    expected = {name: p.grad for name, p in grouped.named_parameters()}
    got = grouped_grads(split, grouped)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOLERANCE[dtype], msg=name)


def test_two_devices_in_eval_mode_with_dropout_and_average_pooling():
    torch.manual_seed(1)
    grouped = (
        AlexNet(num_classes=10, input_size=32, pool_type="avg", activation="tanh", dropout=0.5, width=0.25)
        .double()
        .eval()
    )
    split = TwoDeviceAlexNet(grouped).eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(split(x), grouped(x), **TOLERANCE[torch.float64])


def test_grouped_state_dict_gives_the_same_weights_back():
    torch.manual_seed(2)
    grouped = AlexNet(num_classes=10, input_size=227, width=0.125)
    split = TwoDeviceAlexNet(grouped)
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in grouped.parameters())
    fresh = AlexNet(num_classes=10, input_size=227, width=0.125)
    fresh.load_state_dict(split.grouped_state_dict())
    for (name, a), (_, b) in zip(grouped.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_two_devices_need_the_two_column_net():
    with pytest.raises(ValueError, match="columns=2"):
        TwoDeviceAlexNet(AlexNet(num_classes=10, input_size=32, columns=1, width=0.125))


def test_each_column_lives_on_its_own_device():
    """Column B on a second device (the meta device: parameters without storage) and column A, with fc8, on
    the first; the forward's exchanges are exercised on the CPU by the equivalence tests above."""
    net = TwoDeviceAlexNet(AlexNet(num_classes=10, input_size=32, width=0.125), devices=("cpu", "meta"))
    assert {p.device.type for p in net.column_a.parameters()} == {"cpu"}
    assert {p.device.type for p in net.fc8.parameters()} == {"cpu"}
    assert {p.device.type for p in net.column_b.parameters()} == {"meta"}


def test_optimizer_state_goes_where_its_parameter_is():
    """Momentum of a column-B parameter (here on the meta device) is moved to that device."""
    on_a, on_b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))
    optimizer = torch.optim.SGD([on_a, on_b], lr=0.1, momentum=0.9)
    optimizer.state[on_a]["momentum_buffer"] = torch.ones(3)
    optimizer.state[on_b]["momentum_buffer"] = torch.ones(3)  # where Lightning's restore leaves it: the root
    keep_state_with_parameters(optimizer)
    assert optimizer.state[on_a]["momentum_buffer"].device.type == "cpu"
    assert optimizer.state[on_b]["momentum_buffer"].device.type == "meta"


def test_restored_optimizer_state_is_moved_back_after_lightning_moved_it(monkeypatch):
    """Lightning's restore moves the optimizer state to the root device; the strategy then puts each tensor
    back with its parameter. (No second device here: the order of the two moves is what is checked.)"""
    calls: list[str] = []
    to_root, keep = lightning_strategy._optimizer_to_device, devices_module.keep_state_with_parameters
    monkeypatch.setattr(
        lightning_strategy, "_optimizer_to_device", lambda o, d: calls.append(f"to {d}") or to_root(o, d)
    )
    monkeypatch.setattr(
        devices_module, "keep_state_with_parameters", lambda o: calls.append("kept") or keep(o)
    )
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    saved = {
        "state": {0: {"momentum_buffer": torch.ones(3)}},
        "param_groups": optimizer.state_dict()["param_groups"],
    }
    strategy = ColumnParallelStrategy(device="cpu")
    strategy.optimizers = [optimizer]
    strategy.load_optimizer_state_dict({"optimizer_states": [saved]})
    assert calls == ["to cpu", "kept"]
    assert torch.equal(optimizer.state[param]["momentum_buffer"], torch.ones(3))


def tiny_data() -> AlexNetDataModule:
    return AlexNetDataModule(
        DataConfig(dataset=Dataset.synthetic, image_size=32, resize_size=32, num_classes=10, val_size=32,
                   test_size=32, synthetic_size=64, batch_size=16, num_workers=0, crop_padding=4)
    )  # fmt: skip


def test_lightning_keeps_the_columns_on_their_devices_in_fit_test_and_resume(monkeypatch, tmp_path: Path):
    """Lightning moves the whole module to the root device before fit and before test; each time the strategy
    puts the columns back. A checkpoint of the split net resumes with its momentum."""
    calls: list[str] = []
    to_root, place = SingleDeviceStrategy.model_to_device, TwoDeviceAlexNet.place
    monkeypatch.setattr(
        SingleDeviceStrategy, "model_to_device", lambda s: calls.append("all to root") or to_root(s)
    )
    monkeypatch.setattr(TwoDeviceAlexNet, "place", lambda net: calls.append("columns placed") or place(net))

    def trainer(epochs: int) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=1, strategy=ColumnParallelStrategy(device="cpu"), max_epochs=epochs,
            limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip

    L.seed_everything(0)
    module = AlexNetModule(
        TwoDeviceAlexNet(AlexNet(num_classes=10, input_size=32, width=0.125), ("cpu", "cpu")), num_classes=10
    )
    calls.clear()
    first = trainer(1)
    first.fit(module, datamodule=tiny_data())
    first.test(module, datamodule=tiny_data())
    assert calls == ["all to root", "columns placed"] * 2
    checkpoint = tmp_path / "split.ckpt"
    first.save_checkpoint(checkpoint)
    weights = {k: v.clone() for k, v in module.state_dict().items()}

    resumed = AlexNetModule(
        TwoDeviceAlexNet(AlexNet(num_classes=10, input_size=32, width=0.125), ("cpu", "cpu")), num_classes=10
    )
    second = trainer(2)
    second.fit(resumed, datamodule=tiny_data(), ckpt_path=checkpoint, weights_only=True)
    assert second.current_epoch == 2 and second.global_step == 4  # went on from the first epoch
    momentum = second.optimizers[0].state
    for p in resumed.net.parameters():
        assert momentum[p]["momentum_buffer"].shape == p.shape
    assert any(not torch.equal(v, resumed.state_dict()[k]) for k, v in weights.items())


class NaNLoss(nn.CrossEntropyLoss):
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, labels) * float("nan")


def test_a_diverged_step_changes_no_weight(tmp_path: Path):
    """The step whose loss is NaN still runs its backward (DDP's all-reduce needs it) but updates nothing."""
    L.seed_everything(0)
    module = AlexNetModule(AlexNet(num_classes=10, input_size=32, width=0.125), num_classes=10)
    module.criterion = NaNLoss()
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=tiny_data())
    assert module.diverged.startswith("training loss became nan at epoch 0, step 0")
    assert trainer.current_epoch <= 1  # stopped in the first epoch
    for key, value in module.net.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- The switch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,key,hint",
    [
        (["devices=model_parallel", "model.columns=1"], "model.columns", "devices=model_parallel splits"),
        (["devices=model_parallel", "devices.count=3"], "devices.count", "2 devices"),
        (["devices.count=2"], "devices.count", "devices=ddp devices.count=N"),
        (["devices=ddp", "devices.count=0"], "devices.count", "1 or more"),
        (["devices=ddp", "devices.count=3"], "data.batch_size", "multiple of 3"),
        (["devices.mode=fast"], "devices.mode", "model_parallel"),
        (["trainer.devices=2"], "trainer.devices", "devices=ddp devices.count=N"),
        (
            ["devices=ddp", "trainer.strategy=fsdp"],
            "trainer.strategy",
            "not trainer.devices or trainer.strategy",
        ),
        (["devices=ddp", "optuna={study: s, trial: 0}"], "devices.count", "Optuna"),
    ],
)
def test_bad_devices_switch_names_the_key(compose_cfg, overrides: list[str], key: str, hint: str):
    with pytest.raises((ConfigError, ConfigCompositionException)) as err:  # an enum fails at composition
        check_config(compose_cfg(*overrides))
    message = str(err.value) + str(err.value.__cause__ or "")
    assert key in message and hint in message


def test_devices_switch_sets_the_trainer(compose_cfg):
    one = placement(check_config(compose_cfg()).devices, "cpu")
    assert one.trainer_args == {"devices": 1, "strategy": "auto"} and one.columns is None
    ddp = placement(check_config(compose_cfg("devices=ddp", "devices.count=4")).devices, "cpu")
    assert (
        ddp.trainer_args == {"devices": 4, "strategy": "ddp"}
        and ddp.network(nn.Identity()).__class__ is nn.Identity
    )
    split = placement(check_config(compose_cfg("devices=model_parallel")).devices, "cpu")
    assert split.trainer_args["devices"] == 1 and isinstance(
        split.trainer_args["strategy"], ColumnParallelStrategy
    )
    assert split.columns == (torch.device("cpu"), torch.device("cpu"))
    assert isinstance(split.network(AlexNet(num_classes=10, input_size=32, width=0.125)), TwoDeviceAlexNet)
    # The same values that the Trainer would get anyway are accepted.
    check_config(compose_cfg("devices=ddp", "devices.count=2", "trainer.devices=2", "trainer.strategy=ddp"))


def test_where_and_how_the_net_runs_is_not_the_experiment_but_the_split_form_is(compose_cfg):
    """The memory layout never changes what is trained (one run key); model parallel and DDP are runs of
    their own (a model-parallel checkpoint has another form)."""
    assert run_key(compose_cfg("seed=3")) == run_key(compose_cfg("seed=3", "devices.channels_last=false"))
    keys = {run_key(compose_cfg("seed=3", f"devices={mode}")) for mode in ("one", "model_parallel", "ddp")}
    assert len(keys) == 3


def test_a_sweep_job_is_relaunched_as_itself():
    """In a sweep, Lightning relaunches sys.argv for the other DDP processes: during a job it names that job
    alone (config flags kept, the sweep's own overrides and -m dropped)."""
    argv = ["src/train.py", "-m", "-cn", "train", "--config-dir=/x", "seed=1,2", "hydra.sweep.dir=/s"]
    hydra = [
        "hydra.mode=MULTIRUN",
        "hydra.sweep.dir=/s",
        "hydra/launcher=basic",
        "hydra.searchpath=[file:///c]",
    ]
    argv = ddp._single_run_argv(argv, hydra, ["seed=2", "devices=ddp"])
    kept = ["src/train.py", "-cn", "train", "--config-dir=/x", "hydra.searchpath=[file:///c]"]
    assert argv == [*kept, "seed=2", "devices=ddp"]


# --- Real runs ----------------------------------------------------------------------------------------------


def evaluate(
    net: nn.Module, dm: AlexNetDataModule, images: torch.Tensor, labels: torch.Tensor, stage: str
) -> tuple[float, float]:
    """Top-1 error in this process: the centre crop, and for ``test`` also the ten-view softmax average."""
    with torch.no_grad():
        x = dm.augment(images, stage)
        views = x if x.dim() == 5 else x.unsqueeze(1)
        centre = net(views[:, 0])
        probs = sum(net(views[:, v]).softmax(dim=1) for v in range(views.shape[1])) / views.shape[1]
    return (
        (centre.argmax(1) != labels).float().mean().item(),
        (probs.argmax(1) != labels).float().mean().item(),
    )


def load_grouped(checkpoint: Path, checked: CheckedConfig) -> AlexNet:
    """A run's checkpoint as the one-device grouped net (a model-parallel checkpoint converted back)."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    net = build_network(checked.model)
    if any(k.startswith("column_a.") for k in weights):
        split = TwoDeviceAlexNet(net)
        split.load_state_dict(weights)
        weights = split.grouped_state_dict()
    net.load_state_dict(weights)
    return net.eval()


# Synthetic data, the narrow smoke net, one epoch. Odd validation and test sizes: split over 2 processes,
# Lightning's DistributedSampler would repeat one image of each. A tiny learning rate keeps the weights of
# every step of the epoch those of the checkpoint (up to 1e-9), and without dropout or augmentation training
# sees what evaluation sees: so the training error of the epoch is last.ckpt's error on the training images.
EXACT = [
    "experiment=smoke", "data.synthetic_size=512", "data.val_size=101", "data.test_size=61",
    "data.crops=false", "data.flips=false", "data.pca_color=false", "model.dropout=0",
    "optimizer.lr=1e-9", "optimizer.min_lr=0",
]  # fmt: skip


def test_ddp_job_is_one_mlflow_run_with_exact_metrics(train_run, compose_cfg):
    """Two CPU processes (gloo): one MLflow run, one point per epoch, and every error equal to a
    single-process evaluation of the run's checkpoint on the same images."""
    job = [*EXACT, "devices=ddp", "devices.count=2", "trainer.accelerator=cpu"]
    proc = train_run(*job)
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    (run,) = train_run.runs()  # rank 1 opened no run of its own
    assert run.info.status == "FINISHED"
    assert run.data.params["devices.mode"] == "ddp" and run.data.params["devices.count"] == "2"
    for key in ("train/top1_err", "val/top1_err", "lr-SGD", "train/images_per_sec"):
        assert len(train_run.client.get_metric_history(run.info.run_id, key)) == 1, key  # logged once
    metrics = run.data.metrics
    assert metrics["train/images_per_sec"] > 0

    checked = check_config(compose_cfg(*job))
    dm = AlexNetDataModule(checked.data)
    dm.setup("fit")
    checkpoints = Path(run.data.tags["checkpoint_dir"])
    last, best = (
        load_grouped(checkpoints / "last.ckpt", checked),
        load_grouped(checkpoints / "best.ckpt", checked),
    )
    val, _ = evaluate(last, dm, dm.val_set.images, dm.val_set.labels, "eval")
    train, _ = evaluate(last, dm, dm.train_set.images, dm.train_set.labels, "eval")
    test_1crop, test_10crop = evaluate(best, dm, dm.test_set.images, dm.test_set.labels, "test")
    # Errors strictly between 0 and 1 on 101 images: with one image counted twice, k/101 would be k'/102.
    assert 0 < val < 1 and 0 < test_1crop < 1
    assert metrics["val/top1_err"] == pytest.approx(val, abs=1e-6)
    assert metrics["train/top1_err"] == pytest.approx(train, abs=1e-6)  # all 512, not rank 0's 256
    assert metrics["test/top1_err_1crop"] == pytest.approx(test_1crop, abs=1e-6)
    assert metrics["test/top1_err_10crop"] == pytest.approx(test_10crop, abs=1e-6)


def test_model_parallel_job_trains_the_same_function(train_run, compose_cfg):
    """Both columns on the CPU through the model-parallel code path: a finished run whose checkpoint, back in
    the grouped form on one device, gives the logged test error."""
    job = ["experiment=smoke", "devices=model_parallel", "trainer.accelerator=cpu", "data.test_size=61"]
    train_run(*job)
    (run,) = train_run.runs()
    assert run.info.status == "FINISHED" and run.data.params["devices.mode"] == "model_parallel"
    best = Path(run.data.tags["checkpoint_dir"]) / "best.ckpt"
    assert any(k.startswith("net.column_b.") for k in torch.load(best, weights_only=True)["state_dict"])
    checked = check_config(compose_cfg(*job))
    dm = AlexNetDataModule(checked.data)
    dm.setup("test")
    test_1crop, test_10crop = evaluate(
        load_grouped(best, checked), dm, dm.test_set.images, dm.test_set.labels, "test"
    )
    assert run.data.metrics["test/top1_err_1crop"] == pytest.approx(test_1crop, abs=1e-6)
    assert run.data.metrics["test/top1_err_10crop"] == pytest.approx(test_10crop, abs=1e-6)


@pytest.mark.slow
def test_ddp_jobs_of_a_sweep_each_launch_their_own_processes(train_run):
    """Two DDP jobs in one sweep process: the second must not find the first's launcher or process group."""
    train_run("experiment=smoke", "devices=ddp", "trainer.accelerator=cpu", "seed=1,2", multirun=True)
    runs = train_run.runs()
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert len(train_run.client.get_metric_history(r.info.run_id, "val/top1_err")) == 1
        # Rank 1's Hydra log lies in its own job's folder, not in a single-run folder.
        assert (Path(r.data.tags["output_dir"]) / "train_ddp_process_1.log").is_file()


@pytest.mark.slow
def test_killed_model_parallel_job_resumes_with_the_same_result(train_run, tmp_path: Path):
    job = ["experiment=smoke", "model.width=0.25", "trainer.max_epochs=3", "devices=model_parallel",
           "trainer.accelerator=cpu", "optimizer.plateau_patience=0"]  # fmt: skip
    reference = type(train_run)(tmp_path / "uninterrupted")
    reference.tmp.mkdir(exist_ok=True)
    reference(*job)
    (expected,) = reference.runs()

    train_run.kill_after_first_checkpoint(train_run.start(*job))
    train_run(*job)  # the same command again: resumes from last.ckpt into the same run
    (run,) = train_run.runs()
    assert run.info.status == "FINISHED" and run.data.tags["attempts"] == "2"
    assert run.data.tags["resumed_from"].endswith("last.ckpt")
    for key in ("best/val_top1_err", "final/train_top1_err", "test/top1_err_1crop"):
        assert run.data.metrics[key] == pytest.approx(expected.data.metrics[key], abs=1e-6), key


def test_device_speed_benchmark_runs_on_the_cpu():
    """Every setup's row is there, every images/s is positive, and every ratio is that row's images/s over
    the baseline's (the NCHW one-device row), within the rounding of the printed numbers."""
    import re  # here: this file's imports belong to its other tests

    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_speed.py"), "--device", "cpu",
         "--input-size", "32", "--width", "0.125", "--batch", "8", "--steps", "1", "--rounds", "1",
         "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    rows = {}  # label: (images/s, ratio)
    for line in proc.stdout.splitlines():
        if match := re.fullmatch(r"(.+?)\s+(\d+\.\d)\s+(\d+\.\d\d)x", line.rstrip()):
            rows[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    labels = ("one device, fp32, NCHW", "one column", "model parallel", "bf16 autocast",
              "channels_last", "bf16 autocast + channels_last", "DDP x1")  # fmt: skip
    for label in labels:
        assert any(row.startswith(label) for row in rows), (label, proc.stdout)
    assert len(rows) == len(labels), proc.stdout
    (base,) = [speed for label, (speed, _) in rows.items() if label.startswith("one device, fp32, NCHW")]
    for label, (speed, ratio) in rows.items():
        assert speed > 0, (label, proc.stdout)
        # Rounding alone: images/s printed to 0.05, ratios to 0.005.
        slack = 0.005 + (0.05 + speed / base * 0.05) / (base - 0.05) + 1e-9
        assert abs(ratio - speed / base) <= slack, (label, speed, base, ratio)
    assert "device: CPU" in proc.stdout and "network: 32x32, width 0.125, batch 8" in proc.stdout


@pytest.mark.slow
def test_ddp_in_a_parallel_sweep_stops_before_training(train_run):
    """A joblib worker cannot be relaunched as `python src/train.py ...`: said at once, nothing tracked."""
    proc = train_run(
        "experiment=smoke", "devices=ddp", "trainer.accelerator=cpu", "hydra/launcher=joblib",
        multirun=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "devices=ddp in a sweep needs Hydra's basic launcher" in proc.stdout + proc.stderr
    assert train_run.runs() == []


@pytest.mark.slow
def test_diverged_ddp_job_stops_every_process_and_is_marked(train_run):
    """A NaN loss under DDP: the processes stop together (no one waits for a backward that never comes), and
    the one run is FAILED with diverged=true."""
    proc = train_run(
        "experiment=smoke", "devices=ddp", "trainer.accelerator=cpu", "optimizer.lr=1e12",
        "optimizer.min_lr=0", check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    (run,) = train_run.runs()
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
    assert "training loss became" in run.data.tags["error"]
