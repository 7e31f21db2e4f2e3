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
from omegaconf import DictConfig, read_write

from alexnet.config import DevicesConfig
from alexnet.errors import ConfigError

# Set by rank 0 of a DDP job for the processes Lightning launches (see ``ddp_job``).
HANDOFF_ENV = "ALEXNET_DDP_JOB"
# What Lightning's launcher leaves in the launching process's environment; a sweep's next job must not see it
# (LOCAL_RANK would make Lightning believe that someone else launched the processes, and wait for them).
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
# What makes Lightning take a process for one of SLURM's tasks (SLURMEnvironment.detect).
_SLURM_TASKS = ("SLURM_NTASKS",)
_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
# hydra/launcher=submitit_local and submitit_slurm: each job is a process of its own, as a single run is.
_SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
_SUBMITIT_SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# The script the user started (src/train.py), for the relaunch of a DDP job's other processes where the
# job's process is not that script: submitit runs each job as `python -m submitit.core._submit <folder>`.
# Recorded in the environment, which submitit's jobs inherit, when this module is imported by the script.
SCRIPT_ENV = "ALEXNET_SCRIPT"


def _record_script() -> None:
    import __main__

    if getattr(__main__, "__spec__", None) is None and getattr(__main__, "__file__", None):
        os.environ[SCRIPT_ENV] = os.path.abspath(__main__.__file__)


_record_script()


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
    """Lightning starts a DDP job's other processes by running ``src/train.py`` again with the job's
    overrides. That works where the job has a process of its own: Hydra's basic launcher (the sweep's
    process, one job after another) and submitit's launchers (a process per job, locally or on a SLURM node);
    inside a joblib worker, which runs many jobs, it does not. Stop before anything is tracked."""
    if devices.processes == 1 or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher_cfg = HydraConfig.get().launcher
    launcher = launcher_cfg.get("_target_")
    tasks, nodes = launcher_cfg.get("tasks_per_node", 1), launcher_cfg.get("nodes", 1)
    if launcher == _SUBMITIT_SLURM and (tasks, nodes) != (1, 1):
        raise ConfigError(
            "devices=ddp under hydra/launcher=submitit_slurm needs one task on one node per job "
            f"(hydra.launcher.tasks_per_node=1 and hydra.launcher.nodes=1, not {tasks} and {nodes}): the job "
            "starts its devices.count processes itself. Ask SLURM for the devices with "
            "hydra.launcher.gpus_per_node (or cpus_per_task)."
        )
    if launcher not in (_BASIC_LAUNCHER, _SUBMITIT_LOCAL, _SUBMITIT_SLURM):
        raise ConfigError(
            f"devices=ddp in a sweep needs Hydra's basic launcher (one job after another) or a submitit one "
            f"(hydra/launcher=submitit_local or submitit_slurm: a process per job), not {launcher}: each DDP "
            "job launches its own processes, one per device. Drop hydra/launcher=... for this sweep, or use "
            "submitit."
        )


def _submitit() -> bool:
    return HydraConfig.get().launcher.get("_target_") in (_SUBMITIT_LOCAL, _SUBMITIT_SLURM)


def _submitit_argv(hydra_cfg: DictConfig) -> list[str]:
    """What stands for ``sys.argv`` in a submitit job (whose own is submitit's): the script the user
    started, and the config it was composed from (submitit's process never saw -cp, -cn or -cd)."""
    script = os.environ.get(SCRIPT_ENV) or str(Path(os.environ.get("PROJECT_ROOT", ".")) / "src" / "train.py")
    argv = [script, "--config-name", str(hydra_cfg.job.config_name)]
    for source in hydra_cfg.runtime.config_sources:
        location = str(source.path) if source.schema == "file" else f"{source.schema}://{source.path}"
        if source.provider == "main":
            argv[1:1] = ["--config-path", location]
        elif source.provider == "command-line":
            argv += ["--config-dir", location]
    return argv


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
    saved_env = {key: os.environ.get(key) for key in (*_LAUNCHER_ENV, HANDOFF_ENV, *_SLURM_TASKS)}
    saved_argv, threads = list(sys.argv), torch.get_num_threads()
    hydra_cfg = HydraConfig.get()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    submitit = sweep and _submitit()
    saved_run_dir = hydra_cfg.run.dir if sweep else None
    main_module = sys.modules["__main__"]
    saved_spec = getattr(main_module, "__spec__", None)
    os.environ[HANDOFF_ENV] = files.to_json()
    try:
        if sweep:
            argv = _submitit_argv(hydra_cfg) if submitit else sys.argv
            sys.argv = _single_run_argv(argv, list(hydra_cfg.overrides.hydra), list(hydra_cfg.overrides.task))
            with read_write(hydra_cfg):
                hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # where the other ranks' Hydra logs go
        if submitit:
            # Lightning relaunches `python -m <__main__'s module>` when __main__ has a spec (here submitit's
            # runner); without one, `python <sys.argv[0]>`: the script.
            main_module.__spec__ = None
            # On a SLURM node Lightning would expect SLURM to have started one task per device; the job has
            # one task (check_launcher), and Lightning starts the other processes itself, as on a workstation.
            for key in _SLURM_TASKS:
                os.environ.pop(key, None)
        yield
    finally:
        main_module.__spec__ = saved_spec
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
