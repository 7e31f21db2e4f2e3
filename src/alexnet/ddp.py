"""Data parallel (``devices=ddp``): one MLflow run, however many processes.

The process the user started (rank 0) launches one more process per extra device by running
``src/train.py`` again with this job's overrides (Lightning's subprocess launcher). Rank 0 alone owns the
job's MLflow run, its lock and all logging; ``ddp_job`` hands the other processes what they need from that
run (the checkpoint folder, the checkpoint to resume from) through the environment that Lightning copies
to them, and ``handed_over`` reads it there.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import read_write

from alexnet.config import DevicesConfig
from alexnet.errors import ConfigError

# Set by rank 0 of a DDP job for the processes Lightning launches (see ``ddp_job``).
HANDOFF_ENV = "ALEXNET_DDP_JOB"
# What Lightning's launcher leaves in the launching process's environment; a sweep's next job must not see it
# (LOCAL_RANK would make Lightning believe that someone else launched the processes, and wait for them).
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


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
