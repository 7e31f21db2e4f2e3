"""Passwords in URLs (a tracking server's, a database's) never reach the tracker, a log line or stdout: each
is replaced by ***. Standard library only, so that the Optuna sweeper plugin, which Hydra loads for every
run, can use it without importing the rest of the package."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

# user:password@ in any URL (tracking servers, SQLAlchemy database URLs).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):([^\s@/]+)@")


def mask_secrets(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``, anywhere in ``text``."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def has_secret(text: str) -> bool:
    return mask_secrets(text) != text


def _mask_message(record: logging.LogRecord) -> None:
    message = record.getMessage()
    masked = mask_secrets(message)
    if masked != message:
        record.msg, record.args = masked, None


def _masking_factory(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            _mask_message(record)
        except Exception:  # noqa: BLE001 - a malformed record: the handler reports it as usual
            return record
        if record.exc_info and not record.exc_text:  # the traceback, formatted once, masked
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
        return record

    make.masks_secrets = True  # type: ignore[attr-defined]
    return make


def mask_log_records() -> None:
    """Mask passwords in URLs in every log record this process creates, whichever logger (Hydra's
    launchers, the sweeper, MLflow, Lightning) and whichever handler, also those configured later: the
    record is masked when it is made. alexnet.tracking calls it when imported, which src/train.py does
    before Hydra logs its first line."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "masks_secrets", False):
        logging.setLogRecordFactory(_masking_factory(factory))


def quiet_run_links(uri: str) -> None:
    """MLflow's client prints "View run <name> at: <tracking URI>/#/..." to stdout (not through logging)
    when a run ends: with a password in the URI, it must not."""
    if has_secret(uri):
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


class SecretFilter(logging.Filter):
    """Masks passwords in URLs in every record a handler emits (installed by the task on the root logger's
    handlers, so Hydra's job log and the console never show one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _mask_message(record)
        return True
