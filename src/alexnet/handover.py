"""Resume on any machine: a run's last checkpoint in the tracking store, where every machine of the team reads
it (``logger.checkpoint_artifact``; by default with a tracking server, not with a local store).

At each epoch end, once ModelCheckpoint has saved last.ckpt, ``Uploader`` logs it (and best.ckpt when that
changed) as the run's artifacts ``checkpoint/<slot>/<file>``. Each file alternates between slots 0 and 1, and
the run's tag ``alexnet.checkpoint`` names the copies only once they are complete: a job killed during an
upload leaves the previous copy named. A job that takes a run over and has no newer last.ckpt in its own
checkpoint folder downloads them (``fetch``), their bookkeeping pointed at its own folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from alexnet.errors import require
from alexnet.redaction import mask_secrets

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "alexnet.checkpoint"
LAST, BEST = "last.ckpt", "best.ckpt"  # conf/callbacks/default.yaml


def enabled(setting: Any, uri: str) -> bool:
    """``logger.checkpoint_artifact``: true, false, or auto (with a tracking server other machines reach)."""
    require(setting in (True, False, "auto"), "logger.checkpoint_artifact", setting, "true, false or auto")
    return uri.startswith(("http://", "https://")) if setting == "auto" else setting


def manifest_of(run: Run) -> dict[str, Any] | None:
    text = run.data.tags.get(CHECKPOINT_TAG)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _stamp(path: str | Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _step(path: Path) -> int:
    """The global step a checkpoint was saved at (-1 when unreadable); mmap reads only that entry."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - a damaged or foreign file: the store's copy is preferred
        return -1


class Uploader:
    """``RunLogger.after_save_checkpoint``: the run's last.ckpt (and a changed best.ckpt) into the store."""

    def __init__(self, client: MlflowClient, run_id: str, folder: Path):
        self.client, self.run_id, self.folder = client, run_id, folder
        self.manifest = manifest_of(client.get_run(run_id)) or {"files": {}}  # a resumed run's copies
        # What the folder holds already (a resumed or downloaded checkpoint) is in the store already.
        self.sent = {name: _stamp(folder / name) for name in (LAST, BEST)}

    def __call__(self, callback: ModelCheckpoint) -> None:
        # Called after each callback's save: act once last.ckpt is new (conf/callbacks saves it after best).
        last = self.folder / LAST
        if _stamp(last) in (None, self.sent.get(LAST)):
            return
        files = dict(self.manifest["files"])
        try:
            for role, name in (("last", LAST), ("best", BEST)):
                path = self.folder / name
                stamp = _stamp(path)
                if stamp is None or stamp == self.sent.get(name):
                    continue
                slot = 1 - files.get(role, {}).get("slot", 1)
                self.client.log_artifact(self.run_id, str(path), f"checkpoint/{slot}")
                files[role] = {"artifact": f"checkpoint/{slot}/{name}", "slot": slot}
                self.sent[name] = stamp
            self.manifest = {"dir": callback.dirpath, "step": _step(last), "files": files}
            self.client.set_tag(self.run_id, CHECKPOINT_TAG, json.dumps(self.manifest))
        except (OSError, MlflowException) as err:  # the store keeps the previous copy; training goes on
            log.warning("Could not upload the checkpoint of run %s: %s", self.run_id, mask_secrets(str(err)))


def fetch(client: MlflowClient, run: Run, folder: Path) -> Path | None:
    """The last.ckpt to resume ``run`` from in ``folder``: the local one when it is as new as the store's,
    otherwise the store's (with its best.ckpt), downloaded into ``folder``. None: start from scratch."""
    local = folder / LAST
    manifest = manifest_of(run)
    if manifest is None or "last" not in manifest["files"]:
        return local if local.is_file() else None
    if local.is_file() and _step(local) >= manifest["step"]:
        return local
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        for entry in manifest["files"].values():
            got = Path(client.download_artifacts(run.info.run_id, entry["artifact"], tmp))
            _repoint(got, manifest["dir"], folder)
            os.replace(got, folder / got.name)
    log.info(
        "Downloaded the last checkpoint of run %s (step %s) from the store.",
        run.info.run_id,
        manifest["step"],
    )
    return local


def _repoint(path: Path, old: str, folder: Path) -> None:
    """Point a checkpoint's ModelCheckpoint bookkeeping (its folder, best and last paths) from the machine
    that saved it to ``folder``; otherwise Lightning would keep only a best_model_path that is not here."""
    new = os.path.realpath(folder)

    def move(value: Any) -> Any:
        if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
            return new + value[len(old) :]
        return value

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("dirpath") == old:
            for key, value in state.items():
                state[key] = {move(k): v for k, v in value.items()} if key == "best_k_models" else move(value)
    torch.save(checkpoint, path)
