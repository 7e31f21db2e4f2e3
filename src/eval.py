"""Test a checkpoint: the centre crop and ten views, logged to MLflow.

    python src/eval.py ckpt_path=checkpoints/<run id>/best.ckpt               # on the data it was trained on
    python src/eval.py ckpt_path=... data=folder data.root=/path/to/images     # on other images

The network is rebuilt from the config the checkpoint carries (every checkpoint of src/train.py does); one
from elsewhere needs the model switches on the command line. The result goes to the checkpoint's own MLflow
run when the tracking store has it (metrics ``eval/...``, tags ``eval.*``), otherwise to a new run.
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
from alexnet.errors import DataError  # noqa: E402

log = logging.getLogger(__name__)


def checkpoint_config(cfg: DictConfig, saved: dict) -> DictConfig:
    """The job's config with the network the checkpoint was trained as (its model switches, and the
    two-device form of a model-parallel checkpoint); the data, the trainer and the logger stay the user's."""
    config = saved.get("config") or {}
    with open_dict(cfg):
        if "model" in config:
            model = {k: v for k, v in config["model"].items() if k not in ("num_classes", "input_size")}
            cfg.model = OmegaConf.merge(cfg.model, model)
        if (config.get("devices") or {}).get("mode") == "model_parallel":
            cfg.devices = OmegaConf.merge(cfg.devices, {"mode": "model_parallel", "count": 2})
    return cfg


def evaluate(cfg: DictConfig) -> dict[str, float]:
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt.is_file():
        raise DataError(
            f"No checkpoint {ckpt}: pass ckpt_path=<a .ckpt file>, e.g. checkpoints/<run id>/best.ckpt."
        )
    saved = torch.load(ckpt, map_location="cpu", weights_only=True).get("alexnet", {})
    p = task.prepare(checkpoint_config(cfg, saved))
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
    parts = task.build(p, logger=None, checkpoint_dir=ckpt.parent, provenance={})
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
