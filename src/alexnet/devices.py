"""Where the network runs: one device, section 3.2's two-GPU split of the columns, or data parallel (DDP).

The ``devices`` config group (``conf/devices/``) picks one; ``placement`` turns it into the network's form and
the Trainer's ``devices`` and ``strategy``. None of them changes the function the network computes (that is
``model.columns``, the paper's one-GPU vs two-GPU ablation); only where it is computed.

- ``one``: Lightning's single-device strategy.
- ``model_parallel``: ``TwoDeviceAlexNet`` (model.py), column A on the first device, column B on the second,
  trained by one process with ``ColumnParallelStrategy``, which keeps each column on its device where
  Lightning would move the whole module to one.
- ``ddp``: Lightning's ``ddp`` strategy. The process the user started (rank 0) launches one more process per
  extra device by running ``src/train.py`` again with this job's overrides (Lightning's subprocess launcher).
  Rank 0 alone owns the job's MLflow run, its lock and all logging; ``ddp_job`` hands the other processes what
  they need from that run (the checkpoint folder, the checkpoint to resume from) through the environment that
  Lightning copies to them, and ``handed_over`` reads it there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import read_write
from torch import nn

from alexnet.config import ConfigError, DeviceMode, DevicesConfig
from alexnet.model import AlexNet, TwoDeviceAlexNet

log = logging.getLogger(__name__)

# Set by rank 0 of a DDP job for the processes Lightning launches (see ``ddp_job``).
HANDOFF_ENV = "ALEXNET_DDP_JOB"
# What Lightning's launcher leaves in the launching process's environment; a sweep's next job must not see it
# (LOCAL_RANK would make Lightning believe that someone else launched the processes, and wait for them).
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


# --- Model parallel: section 3.2's two GPUs -----------------------------------------------------------------


def column_devices(accelerator: str) -> tuple[torch.device, torch.device]:
    """The devices of column A and column B for ``trainer.accelerator``: the CPU twice on ``cpu``; cuda:0 and
    cuda:1 on ``gpu`` (cuda:0 twice, with a warning, on a machine with one GPU: the same code path, no
    speed-up); ``auto`` is ``gpu`` where CUDA is available, else ``cpu``."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(
                f"trainer.accelerator={accelerator}: devices=model_parallel found no CUDA device; use "
                "trainer.accelerator=cpu (both columns on the CPU) or run on a GPU machine."
            )
        if count == 1:
            log.warning(
                "devices=model_parallel on a machine with one GPU: both columns on cuda:0 (the "
                "model-parallel code path, without a second device to gain from)."
            )
            return torch.device("cuda", 0), torch.device("cuda", 0)
        return torch.device("cuda", 0), torch.device("cuda", 1)
    raise ConfigError(
        f"trainer.accelerator={accelerator}: devices=model_parallel runs on cpu, gpu or auto; use one."
    )


def _two_device_nets(module: nn.Module) -> list[TwoDeviceAlexNet]:
    return [m for m in module.modules() if isinstance(m, TwoDeviceAlexNet)]


def keep_state_with_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's optimizer state (momentum) on that parameter's device."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":  # Lightning keeps "step" where torch put it
                    state[key] = value.to(param.device)


class ColumnParallelStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy for one process that drives the two columns on two devices.

    Lightning moves the whole module to the root device before fit, validate and test (``model_to_device``),
    and moves a restored optimizer state there too (``load_optimizer_state_dict``). Here both are followed by
    putting every ``TwoDeviceAlexNet`` column back on its own device, with its momentum. The root device is
    column A's: batches, labels, logits and the loss live there.
    """

    strategy_name = "column_parallel"

    def model_to_device(self) -> None:
        super().model_to_device()
        for net in _two_device_nets(self.model):
            net.place()

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        for optimizer in self.optimizers:
            keep_state_with_parameters(optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        for optimizer in self.optimizers:
            keep_state_with_parameters(optimizer)


# --- The switch ---------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """What the ``devices`` group means for one job: the Trainer's arguments, and the devices of the two
    columns when the network is split (``None`` otherwise)."""

    trainer_args: dict[str, Any]
    columns: tuple[torch.device, torch.device] | None = None

    def network(self, net: nn.Module) -> nn.Module:
        """``net`` in the form that runs here: split over the column devices for model parallel."""
        if self.columns is None:
            return net
        assert isinstance(net, AlexNet)  # check_config allows model_parallel only for the two-column AlexNet
        return TwoDeviceAlexNet(net, self.columns)


def placement(devices: DevicesConfig, accelerator: str) -> Placement:
    if devices.mode is DeviceMode.model_parallel:
        columns = column_devices(accelerator)
        return Placement({"devices": 1, "strategy": ColumnParallelStrategy(device=columns[0])}, columns)
    if devices.mode is DeviceMode.ddp:
        # Lightning picks the process group's backend from the accelerator: gloo on CPUs, nccl on GPUs.
        return Placement({"devices": devices.count, "strategy": "ddp"})
    return Placement({"devices": 1, "strategy": "auto"})


# --- Data parallel: one MLflow run, however many processes --------------------------------------------------


def rank() -> int:
    """This process's rank, known before any Trainer exists: Lightning reads it from the environment its
    launcher sets for the processes it starts (LOCAL_RANK); 0 in the process the user started."""
    return rank_zero_only.rank


@dataclass
class JobFiles:
    """What the other processes of a DDP job need from rank 0's MLflow run."""

    checkpoint_dir: Path
    resume_from: Path | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "checkpoint_dir": str(self.checkpoint_dir),
                "resume_from": self.resume_from and str(self.resume_from),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> JobFiles:
        values = json.loads(text)
        resume = values["resume_from"]
        return cls(Path(values["checkpoint_dir"]), Path(resume) if resume else None)


def handed_over() -> JobFiles:
    """In a process that Lightning launched for a DDP job: the job's files, from rank 0."""
    text = os.environ.get(HANDOFF_ENV)
    if text is None:
        raise RuntimeError(
            f"This process has rank {rank()} but no {HANDOFF_ENV} in its environment: it was not started "
            "by a devices=ddp job of src/train.py. Start DDP jobs as `python src/train.py devices=ddp "
            "devices.count=N` and let Lightning launch the other processes (torchrun and SLURM launching "
            "are not supported)."
        )
    return JobFiles.from_json(text)


def check_launcher(devices: DevicesConfig) -> None:
    """Lightning starts a DDP job's other processes by running ``src/train.py`` again; inside a joblib worker
    there is no such command line. Stop before anything is tracked."""
    if devices.processes == 1 or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = HydraConfig.get().launcher.get("_target_")
    if launcher != _BASIC_LAUNCHER:
        raise ConfigError(
            f"devices=ddp in a sweep needs Hydra's basic launcher (one job after another), not {launcher}: "
            "each DDP job launches its own processes, one per device. Drop hydra/launcher=... for this sweep."
        )


def _single_run_argv(argv: list[str], hydra_overrides: list[str], task_overrides: list[str]) -> list[str]:
    """The command line that runs one job of a sweep on its own: the script, the config flags (-cp, -cn,
    -cd), the job's Hydra overrides without the sweep's, and the job's own overrides; no -m."""
    kept, flags = [argv[0]], ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
    args = iter(argv[1:])
    for arg in args:
        if arg in flags:
            kept += [arg, next(args, "")]
        elif arg.startswith(tuple(f"{flag}=" for flag in flags if flag.startswith("--"))):
            kept.append(arg)
    sweep_only = (
        "hydra.mode",
        "hydra.sweep",
        "hydra.launcher",
        "hydra/launcher",
        "hydra.sweeper",
        "hydra/sweeper",
    )
    kept += [o for o in hydra_overrides if not o.lstrip("+~").startswith(sweep_only)]
    return kept + task_overrides


@contextmanager
def ddp_job(devices: DevicesConfig, files: JobFiles) -> Iterator[None]:
    """Around the fit and test of a DDP job in the process that launches the others (rank 0).

    - ``HANDOFF_ENV`` tells them the job's files (Lightning copies this environment to them).
    - In a sweep (``-m``), Lightning would relaunch ``sys.argv``, i.e. the whole sweep, in a single-run
      folder: for the duration of the job both say this job instead (``_single_run_argv``, the job's folder).
    - Afterwards the process is left as before, so the sweep's next job starts its own processes: the process
      group is destroyed, and the launcher's environment variables and thread count are restored.
    """
    if devices.processes == 1:
        yield
        return
    saved_env = {key: os.environ.get(key) for key in (*_LAUNCHER_ENV, HANDOFF_ENV)}
    saved_argv, threads = list(sys.argv), torch.get_num_threads()
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    saved_run_dir = hydra_cfg.run.dir if sweep else None
    os.environ[HANDOFF_ENV] = files.to_json()
    try:
        if sweep:
            sys.argv = _single_run_argv(
                sys.argv, list(hydra_cfg.overrides.hydra), list(hydra_cfg.overrides.task)
            )
            with read_write(hydra_cfg):
                hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # where the other ranks' Hydra logs go
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        if sweep:
            with read_write(hydra_cfg):
                hydra_cfg.run.dir = saved_run_dir
