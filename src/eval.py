"""Test a checkpoint: the centre crop and ten views, logged to MLflow.

    python src/eval.py ckpt_path=checkpoints/<run id>/best.ckpt               # on the data it was trained on
    python src/eval.py ckpt_path=... data=folder data.root=/path/to/images     # on other images

The network and, unless the command line names other data (``data=...`` or ``data.<key>=...``), the data
are the checkpoint's own, from the config it carries (every checkpoint of src/train.py does); one from
elsewhere needs the model switches on the command line. Other data must have the checkpoint's number of
classes. Only the test split is read: it is normalised with the training images' pixel statistics, which
the checkpoint carries too. The result goes to the checkpoint's own MLflow run when the tracking store has
it (metrics ``eval/...``, tags ``eval.*``), otherwise to a new run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from alexnet import task, tracking  # noqa: E402
from alexnet.data import AlexNetDataModule  # noqa: E402
from alexnet.errors import ConfigError, DataError  # noqa: E402
from alexnet.presets import PixelStats  # noqa: E402

log = logging.getLogger(__name__)


# Data keys that say where things are on this machine, not what the data is: never taken from a checkpoint.
LOCAL_DATA_KEYS = ("cache_dir", "num_workers", "on_device", "download")


def checkpoint_config(cfg: DictConfig, saved: dict, overrides: list[str] | None = None) -> DictConfig:
    """The job's config with the network the checkpoint was trained as (its model switches, and the
    two-device form of a model-parallel checkpoint) and the data it was trained on, less what the command
    line ``overrides`` say of the data: ``data=...`` keeps the user's data, ``data.<key>=...`` that key.
    The trainer and the logger stay the user's."""
    config = saved.get("config") or {}
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides or []]
    with open_dict(cfg):
        if "model" in config:
            model = {k: v for k, v in config["model"].items() if k not in ("num_classes", "input_size")}
            cfg.model = OmegaConf.merge(cfg.model, model)
        if (config.get("devices") or {}).get("mode") == "model_parallel":
            cfg.devices = OmegaConf.merge(cfg.devices, {"mode": "model_parallel", "count": 2})
        if config.get("data") and "data" not in keys:
            kept = {k.removeprefix("data.") for k in keys if k.startswith("data.")} | set(LOCAL_DATA_KEYS)
            cfg.data = OmegaConf.merge(
                cfg.data, {k: v for k, v in config["data"].items() if k in cfg.data and k not in kept}
            )
    return cfg


def read_checkpoint(ckpt: Path) -> tuple[dict, PixelStats | None]:
    """What the checkpoint says of itself (``alexnet``: its run and config) and its training images' pixel
    statistics (None in checkpoints from before they were saved)."""
    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # a file that is not a checkpoint: torch's message is a page long
        raise DataError(f"Cannot read checkpoint {ckpt}: {str(err).splitlines()[0]}") from None
    data = checkpoint.get(AlexNetDataModule.__qualname__) or {}
    stats = PixelStats.from_json(data["pixel_stats"]) if "pixel_stats" in data else None
    saved = dict(checkpoint.get("alexnet", {}))
    saved["classes"] = data.get("classes")
    saved["fc8_rows"] = next((w.shape[0] for k, w in checkpoint.get("state_dict", {}).items()
                              if k.endswith("fc8.weight")), None)  # fmt: skip
    return saved, stats


def check_fits(p: task.Prepared, saved: dict, ckpt: Path) -> None:
    """The data must give the network the checkpoint holds: its number of classes and its input size."""
    model = (saved.get("config") or {}).get("model") or {}
    trained, classes = model.get("num_classes") or saved.get("fc8_rows"), p.checked.model.num_classes
    where = f"{p.checked.data.dataset.value} {p.cfg.data.root or ''}".strip()
    if trained is not None and trained != classes:
        raise DataError(
            f"Checkpoint {ckpt} has {trained} classes but the data ({where}) has {classes}: evaluate it on "
            f"images of its {trained} classes."
        )
    side = model.get("input_size")
    if side is not None and side != p.checked.model.input_size:
        raise ConfigError(
            f"data.image_size={p.checked.model.input_size} is not allowed: checkpoint {ckpt} takes "
            f"{side}x{side} images; set data.image_size={side} (and data.resize_size)."
        )
    names, found = saved.get("classes"), p.facts.class_names
    if names and found and list(found) != names:  # labels are the classes' sorted order: say so
        log.warning("The checkpoint's classes %s and the data's %s have other names", names, list(found))


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("ckpt_path") is None:
        raise ConfigError(
            "ckpt_path is not set: give the checkpoint to test, e.g. ckpt_path=checkpoints/<run id>/best.ckpt"
        )
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt.is_file():
        raise DataError(
            f"No checkpoint {ckpt}: pass ckpt_path=<a .ckpt file>, e.g. checkpoints/<run id>/best.ckpt."
        )
    saved, stats = read_checkpoint(ckpt)
    overrides = task.job_info()["overrides"]
    p = task.prepare(checkpoint_config(cfg, saved, overrides), train=stats is None)
    check_fits(p, saved, ckpt)
    uri = tracking.tracking_uri(p.cfg)
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    run_id = saved.get("run_id")
    try:
        own = run_id is not None and client.get_run(run_id) is not None
    except MlflowException:
        own = False
    if not own:
        exp = tracking.experiment_id(client, p.cfg, uri)
        run_id = client.create_run(
            exp, tags={"mlflow.runName": f"eval {ckpt.name}", "eval.of": str(ckpt)}
        ).info.run_id
    logger = tracking.RunLogger(experiment_name=p.cfg.logger.experiment_name, tracking_uri=uri, run_id=run_id)
    parts = task.build(p, logger=None, checkpoint_dir=ckpt.parent, provenance={}, stats=stats)
    parts.trainer.test(parts.module, datamodule=parts.datamodule, ckpt_path=str(ckpt), weights_only=True)
    metrics = {
        k.replace("test/", "eval/"): float(v)
        for k, v in parts.trainer.callback_metrics.items()
        if k.startswith("test/")
    }
    logger.log_metrics(metrics)
    tags = {"eval.checkpoint": str(ckpt), "eval.data": f"{p.checked.data.dataset.value} {p.cfg.data.root}",
            "eval.data_fingerprint": p.facts.fingerprint}  # fmt: skip
    tracking.tag_run(logger, tags, status=None if own else "FINISHED")
    tracking.log_outcomes(
        logger, parts.module.test_outcomes, parts.datamodule.test_set_labels(), prefix="eval"
    )
    log.info("%s run %s: %s", "the checkpoint's" if own else "a new", run_id, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> dict[str, float]:
    return task.entry(evaluate, cfg)


if __name__ == "__main__":
    main()
