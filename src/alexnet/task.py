"""What every task (``src/train.py``, ``src/eval.py``) needs around its Lightning calls: the checks before
anything runs, the parts built from the config, and the life of the job's MLflow run.

- ``prepare``: a factorial run's switches applied, the data probed (its classes and fingerprint), every key
  checked; all before a run is opened, so a mistake costs one line and no run.
- ``build``: data, network, LightningModule, callbacks (config group ``conf/callbacks/``) and Trainer.
- ``tracked``: the run's end: FINISHED when the work returns, FAILED with the error (or KILLED, or PRUNED)
  when it raises; the per-config lock and the run's lease released either way.
- ``entry``: the Hydra ``main`` wrapper: a person's mistake (``UserError``) is one line, not a traceback; a
  run another live job holds is a one-line skip; every other error's traceback is printed masked.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from alexnet import ddp, design, devices, lease, redaction, search, sweeps, tracking
from alexnet.config import CheckedConfig, DataConfig, DevicesConfig, _typed, check_config
from alexnet.data import AlexNetDataModule
from alexnet.errors import Diverged, UserError
from alexnet.images import DataFacts, probe
from alexnet.model import build_network
from alexnet.module import AlexNetModule
from alexnet.presets import PixelStats
from alexnet.splits import val_size_for

log = logging.getLogger(__name__)


def job_info() -> dict[str, Any]:
    """What Hydra knows about this job: its number in a sweep, its overrides, its folders, and the sweep's
    own command line (its multirun.yaml), which names the sweep's parent run."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    info: dict[str, Any] = {
        "num": hc.job.num if multirun else 0,
        "overrides": list(hc.overrides.task),
        "output_dir": hc.runtime.output_dir,
        "sweep_dir": hc.sweep.dir if multirun else None,
    }
    saved = Path(hc.sweep.dir) / "multirun.yaml" if multirun else None
    if saved is not None and saved.is_file():
        info["sweep_overrides"] = list(OmegaConf.load(saved).hydra.overrides.task)
    return info


@dataclass
class Prepared:
    """A job's config after every check: the config itself (a factorial run's switches applied), its typed
    sections, what its data is, and what Hydra knows about the job."""

    cfg: DictConfig
    checked: CheckedConfig
    facts: DataFacts
    job: dict[str, Any]


def prepare(cfg: DictConfig, train: bool = True) -> Prepared:
    """Everything that can be wrong with a job, found before any run is opened or any weight allocated: the
    config, the devices against this machine's, the data's files. ``train=False`` (src/eval.py with a
    checkpoint's pixel statistics): the test split alone, no validation split."""
    cfg = design.apply_run(cfg)
    job = job_info()
    if "devices" in cfg and "trainer" in cfg:  # the machine before the files (check_config names a lack)
        wanted = _typed("devices", DevicesConfig, OmegaConf.to_container(cfg.devices, resolve=True))
        devices.check_machine(wanted, str(cfg.trainer.get("accelerator", "auto")))
    if cfg.data.get("num_classes") is None or cfg.data.get("test_split") is None:
        # data=folder leaves them to the folders: look there first, then check everything.
        facts = probe(_typed("data", DataConfig, OmegaConf.to_container(cfg.data, resolve=True)), train)
        with open_dict(cfg):
            cfg.data.num_classes = cfg.data.num_classes or facts.num_classes
            cfg.data.test_split = cfg.data.test_split or facts.test_split
        checked = check_config(cfg)
    else:  # the cheap checks first
        checked = check_config(cfg)
        facts = probe(checked.data, train)
    if train:  # the validation split this data set can hold out (alexnet.splits.val_size_for)
        given = any(o.lstrip("+~").split("=", 1)[0] == "data.val_size" for o in job["overrides"])
        val_size = val_size_for(checked.data, facts.train_counts, given)
        if val_size != checked.data.val_size:
            with open_dict(cfg):
                cfg.data.val_size = val_size
            checked = check_config(cfg)
    search.check_run_mode(cfg)
    ddp.check_launcher(checked.devices)
    return Prepared(cfg, checked, facts, job)


@dataclass
class Parts:
    datamodule: AlexNetDataModule
    module: AlexNetModule
    trainer: L.Trainer
    checkpoints: ModelCheckpoint | None  # the best.ckpt callback; None when ~callbacks.model_checkpoint


def build(
    p: Prepared,
    logger: Any,
    checkpoint_dir: Path,
    provenance: dict[str, Any],
    stats: PixelStats | None = None,
) -> Parts:
    """Data, network, module, callbacks and Trainer from the config. ``logger`` is the job's MLflow logger
    (None in the other processes of a DDP job, which log nothing). Every process builds the same parts.
    ``stats``: a checkpoint's pixel statistics, for testing it (src/eval.py) without its training images."""
    cfg, checked = p.cfg, p.checked
    L.seed_everything(cfg.seed, workers=True)
    place = devices.placement(checked.devices, accelerator=str(cfg.trainer.accelerator))
    module = AlexNetModule(
        place.network(build_network(checked.model, seed=cfg.seed)),
        num_classes=checked.model.num_classes,
        optimizer=checked.optimizer,
        target_train_error=cfg.target_train_error,
        stop_at_target=cfg.stop_at_target,
        provenance=provenance,
    )
    callbacks = []
    for node in (cfg.get("callbacks") or {}).values():  # the checkpoints go to the run's own folder
        where = {"dirpath": str(checkpoint_dir)} if str(node._target_).endswith("ModelCheckpoint") else {}
        callbacks.append(hydra.utils.instantiate(node, **where))
    checkpoints = next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    if logger is None:  # callbacks that log need a logger: rank 0's job
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    else:
        callbacks += search.trial_callbacks(cfg, logger)  # reports to the Optuna trial when the job is one
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=logger or False,
        callbacks=callbacks,
        default_root_dir=p.job["output_dir"],
        **place.trainer_args,
    )
    return Parts(AlexNetDataModule(checked.data, seed=cfg.seed, stats=stats), module, trainer, checkpoints)


def provenance(p: Prepared, run_id: str | None) -> dict[str, Any]:
    """What every checkpoint carries: its run, and the resolved config it was trained with (masked)."""
    config = OmegaConf.to_container(p.cfg, resolve=True, enum_to_str=True)
    config.pop("hydra", None)
    for key in ("logger", "paths"):
        config.pop(key, None)
    return {"run_id": run_id, "config": config, "fingerprint": p.facts.fingerprint}


@contextmanager
def tracked(run: tracking.TrackedRun) -> Iterator[None]:
    """The run's end, whatever the work inside does; none when another job has taken the run over."""
    logger = run.logger
    sweeps.job_started(logger.experiment, run.run_id)
    try:
        yield
        if run.held is not None:
            run.held.check()  # a job that lost its lease must not end the run another job now trains
        tracking.finish(logger)
    except BaseException as err:
        if run.lost:  # the run is another job's now: so is its end
            raise
        if isinstance(err, search.TrialPruned):  # the study's pruner stopped this trial: not a failure
            search.mark_pruned(logger, err)
        elif isinstance(err, Diverged):
            logger.experiment.set_tag(run.run_id, "diverged", "true")
            tracking.mark_failed(logger, err)
        elif isinstance(err, (KeyboardInterrupt, SystemExit)):
            tracking.mark_failed(logger, err, status="KILLED")
        else:
            tracking.mark_failed(logger, err)
        raise
    finally:
        run.release()  # when the job ends, not the process: a sweep runs its jobs in one process
        if not run.lost:
            sweeps.job_ended(logger.experiment, run.run_id)


def entry(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a Hydra task, every way out of it masked (alexnet.redaction): log lines, the console, and an
    unexpected error, whose traceback goes to stderr masked (then exit 1; in a sweep the job fails with the
    masked message and the sweep goes on). A person's mistake (a config value, missing data, an unreachable
    server) is one line, which also stops a sweep: every other job would meet it too. A run that another
    live job holds is skipped in one line, and a sweep goes on. In an Optuna study the trial's own values may
    be the mistake, so only that trial fails (the sweeper records why) and the study goes on."""
    redaction.mask_output()
    redaction.remember_url(OmegaConf.select(cfg, "logger.tracking_uri", default=None))
    redaction.remember_url(HydraConfig.get().sweeper.get("storage"))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, redaction.SecretFilter) for f in handler.filters):
            handler.addFilter(redaction.SecretFilter())
    try:
        return task(cfg)
    except lease.Held as held:
        if cfg.get("optuna"):
            raise
        log.warning("Skipped: %s", held)
        return None
    except UserError as err:
        if cfg.get("optuna"):
            raise
        raise SystemExit(f"{err.label}: {redaction.mask_secrets(str(err))}") from None
    except search.TrialPruned:  # the study's pruner at work, not an error: the sweeper needs it as it is
        raise
    except Exception as err:  # a bug, or a library's error (MLflow's quote the URL): its traceback, masked
        text = redaction.mask_secrets("".join(traceback.format_exception(err)))
        message = redaction.mask_secrets(f"{type(err).__name__}: {err}")
    sys.stderr.write(text)
    if HydraConfig.get().mode == RunMode.RUN:
        raise SystemExit(1)
    raise redaction.MaskedError(message)  # raised here, outside the handler: no unmasked exception chained
