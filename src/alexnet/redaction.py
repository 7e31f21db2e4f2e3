"""Passwords never reach the tracker, a log line, stdout or stderr: each is replaced by ***. Only the standard
library and Hydra, so that the Optuna sweeper plugin, which Hydra loads for every run, can use it without
importing the rest of the package.

- ``mask_secrets`` masks any text: ``user:password@`` in any URL (the password may hold ``/``, ``@`` or
  spaces), ``password=...``-like query strings and key=value pairs, ``Authorization:`` headers, and every
  password this process knows literally (``remember``: from its environment, and from the URLs it is given,
  parsed with urllib.parse: ``remember_url``), also where one appears without its URL.
- ``mask_log_records``: every log record; ``mask_output``: everything written to sys.stdout and sys.stderr
  (Hydra's printed tracebacks, MLflow's prints, Python's own last traceback).
- ``RefuseSecretsOnCommandLine``: a Hydra callback that stops a command line holding a password before Hydra
  writes it, as typed, into ``.hydra/``, ``multirun.yaml`` and submitit's job files.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

from hydra.experimental.callback import Callback

MASK = "***"
# user:password@host in any URL (tracking servers, SQLAlchemy database URLs). The password runs to the URL's
# last @ (none after it before the next space), so "/", "@" and spaces in it are masked too: user:pa/ss@host,
# user:p@ss@host, user:p@ss/word@host, user:my pass@host. In host:5000/... the 5000 is a port, not a password.
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@?#\[]*):"
    r"(?!\d+(?:[/?#\s,;'\")\]]|$))"
    r"(?P<password>[^\n]{0,256}?)"
    r"@(?=[^\s@]*(?:\s|$))"
)
_SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token", "access_token", "api_key", "apikey")
# ?password=..., &token=..., password=... in a libpq connection string.
_KEY_SECRET = re.compile(rf"(?i)\b((?:{'|'.join(_SECRET_KEYS)})=)[^&\s]+")
_AUTHORIZATION = re.compile(r"(?i)(authorization:\s*(?:basic|bearer|token)\s+)\S+")
# Passwords this process knows, masked wherever they appear. Shorter ones would mask ordinary words; the
# patterns above still mask them inside URLs.
_known: set[str] = set()
MIN_KNOWN_LENGTH = 6
# Where MLflow, libpq and the team setup take passwords from, besides URLs.
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
URL_ENV = ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "MLFLOW_BACKEND_STORE_URI")


def mask_secrets(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``, anywhere in ``text``; also
    ``?password=...`` and the passwords ``remember`` was given."""
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _KEY_SECRET.sub(rf"\1{MASK}", text)
    return _AUTHORIZATION.sub(rf"\1{MASK}", text)


def remember(secret: str | None) -> None:
    """Mask ``secret`` (and its percent-encoded and decoded forms) wherever it appears from now on."""
    if not secret or secret == MASK:
        return
    for form in {secret, urllib.parse.unquote(secret), urllib.parse.quote(secret, safe="")}:
        if len(form) >= MIN_KNOWN_LENGTH:
            _known.add(form)


def remember_url(url: str | None) -> None:
    """The password of a value known to be a URL (a tracking URI, a database URL), parsed rather than matched.
    urllib cannot split a password holding "/" or "@": then everything between the user's ":" and the URL's
    last "@" is taken for it too (masking a little more, never less)."""
    if not url or "://" not in url:
        return
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if ":" in userinfo:
        remember(userinfo.split(":", 1)[1])
    try:
        parts = urllib.parse.urlsplit(url.strip())
        remember(parts.password)
        for key, values in urllib.parse.parse_qs(parts.query).items():
            if key.lower() in _SECRET_KEYS:
                for value in values:
                    remember(value)
    except ValueError:  # not a URL after all (an invalid port, a bracket): the patterns still mask it
        pass


def mask_url(url: str) -> str:
    """A value known to be a URL, its password masked (and remembered: an error that quotes it is masked)."""
    remember_url(url)
    return mask_secrets(url)


def remember_environment(environ: dict[str, str] | None = None) -> None:
    """The passwords in this process's environment: MLflow's and libpq's own, and those in the URLs."""
    environ = os.environ if environ is None else environ
    for key in SECRET_ENV:
        remember(environ.get(key))
    for key in URL_ENV:
        remember_url(environ.get(key))


remember_environment()


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


class _MaskedStream:
    """A text stream whose every write is masked; everything else is the stream's own."""

    masks_secrets = True

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask_secrets(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def mask_output() -> None:
    """Mask everything written to sys.stdout and sys.stderr from now on: what Hydra prints of a failed job
    (its overrides, the traceback), MLflow's and Lightning's prints, Python's last traceback."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not getattr(stream, "masks_secrets", False):
            setattr(sys, name, _MaskedStream(stream))


class MaskedError(RuntimeError):
    """An unexpected error of a job, its message masked (its traceback, masked, went to stderr)."""


class RefuseSecretsOnCommandLine(Callback):
    """A Hydra callback (``hydra.callbacks`` in conf/hydra/default.yaml). Hydra writes the command line as
    typed into ``.hydra/`` (config.yaml, hydra.yaml, overrides.yaml), the sweep's multirun.yaml and
    submitit's job files before any job runs, so a password in an override is refused at once: passwords come
    from the environment, where the config reads them without Hydra writing them down."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: Any) -> None:
        overrides = config.hydra.overrides
        for override in [*overrides.hydra, *overrides.task]:
            if has_secret(str(override)):
                key = str(override).split("=", 1)[0]
                # SystemExit: Hydra turns a callback's exceptions into warnings.
                raise SystemExit(
                    f"Config error: {key} on the command line holds a password, which Hydra would write into "
                    ".hydra/ and submitit's job files. Give it through the environment instead: "
                    "MLFLOW_TRACKING_URI (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), "
                    "OPTUNA_STORAGE with PGPASSFILE (docs/team.md)."
                )
