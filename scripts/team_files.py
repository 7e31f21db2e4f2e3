"""The team setup's own files (settings.json, credentials.json, pgpass, mlflow.pid, PostgreSQL's
configuration), written so that a crash at any moment leaves either the old file or the new one, never
half of one: a process killed between creating a file and filling it would otherwise leave an empty
credentials.json, and every later command would fail on it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class TeamError(RuntimeError):
    """Something a person can fix; printed as one line."""


def _fsync_dir(folder: Path) -> None:
    """The rename itself is durable only once the folder's entry is on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, text: str, mode: int = 0o644, owner: tuple[int, int] | None = None, exclusive: bool = False
) -> bool:
    """Write ``text`` to a temporary file beside ``path`` (created with ``mode``, so a password is never
    readable by others, not even for a moment), fsync it, and rename it over ``path``. ``owner``: (uid, gid)
    to give it (PostgreSQL's files, written as root). ``exclusive``: only if ``path`` does not exist yet
    (two `start`s at once must not make two different passwords); False when it did."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)  # mkstemp's 0600, or what was asked, whatever the umask
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # fails if the file exists: create-if-absent, atomically
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)
    return True


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """The object in ``path``; a TeamError in one line, naming the file and ``fix``, when the file is empty,
    truncated or not an object (left by an older version killed mid-write, or edited by hand)."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        problem = "is empty" if path.stat().st_size == 0 else f"is not valid JSON ({err})"
    else:
        if isinstance(value, dict):
            return value
        problem = f"holds a {type(value).__name__}, not an object"
    raise TeamError(f"{path} {problem}: {fix}")


def rewrite(path: Path, text: str) -> None:
    """Replace a file at once, keeping its owner and mode (PostgreSQL's configuration, written as root)."""
    st = path.stat()
    if path.read_text() != text:
        write_atomic(path, text, mode=st.st_mode & 0o777, owner=(st.st_uid, st.st_gid))
