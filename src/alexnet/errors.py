"""The platform's errors that a person fixes, not a programmer: each message says what was wrong, where, and
what to do, and ``src/train.py`` / ``src/eval.py`` print it as one line, without a traceback.

Everything else (a bug, a crash inside a library) keeps its traceback: that one is for us.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake in what the user asked for or pointed at; the message is the whole story."""

    label = "Error"


class ConfigError(UserError, ValueError):
    """A config value that cannot work. The message names the key, the value and what is allowed."""

    label = "Config error"


class DataError(UserError, FileNotFoundError):
    """The data is missing, unreadable or of a shape the network cannot take; the message names the file or
    folder, and the setting to change."""

    label = "Data error"


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be used. The message says which URI or folder, and what to do."""

    label = "Tracking error"


class ReportError(UserError, RuntimeError):
    """The report cannot be made: the message says what is missing and what to run."""

    label = "Report error"


class Diverged(RuntimeError):
    """The training loss, or a number reported to an Optuna trial, is not finite. The run ends FAILED with
    the tag ``diverged=true``; an Optuna trial ends FAIL."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError("key=value is not allowed: allowed.")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")
