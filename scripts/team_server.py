"""The team setup on one machine: PostgreSQL 15, an MLflow tracking server on it, an Optuna storage on it.

    python scripts/team_server.py start     # or: eval "$(python scripts/team_server.py start)"
    python scripts/team_server.py status
    python scripts/team_server.py stop
    python scripts/team_server.py writers 8 16     # concurrent writers the server takes (docs/team.md)

``start`` creates (the first time) a PostgreSQL cluster under ``--root`` (default ``.team/`` at the project
root), a role ``alexnet`` with a generated password and two databases, ``mlflow`` and ``optuna``; starts
PostgreSQL and ``mlflow server`` (artifacts under ``--root``/artifacts), both bound to 127.0.0.1 unless
``--host`` says otherwise; waits until the server answers; and prints, on stdout and nothing else, the lines
to export, which hold no password:

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    export OPTUNA_STORAGE=postgresql+psycopg://alexnet@127.0.0.1:5432/optuna
    export PGPASSFILE=/path/to/.team/pgpass
    export MLFLOW_DISABLE_TELEMETRY=true

Running ``start`` again reuses what runs. The passwords live in ``--root``/credentials.json (mode 0600); the
role's is also in ``--root``/pgpass (0600, PostgreSQL's password file format), where libpq (under psycopg)
finds it for OPTUNA_STORAGE. The MLflow server gets its database URL through its environment, never its
command line (which ``ps`` shows to every user of the machine). Progress and errors go to stderr.

PostgreSQL refuses to run as root: as root, the cluster belongs to and runs as the user ``postgres``
(``--pg-user``), through ``runuser``.

The processes themselves are in team_services.py (``Postgres``, ``MlflowServer``), the writers' measurement
in team_load.py; the tests (tests/test_team_server.py) use the same functions for throwaway clusters and
servers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# The script's own folder is on sys.path when it runs; the tests put it there to load it.
from team_files import read_json, write_atomic
from team_load import cmd_writers
from team_services import (
    LOOPBACK,
    NO_TELEMETRY,
    PG_MAJOR,
    ROLE,
    MlflowServer,
    Postgres,
    TeamError,
    free_port,
    log,
    port_in_use,
    stop_group,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT / ".team"
DATABASES = ("mlflow", "optuna")
DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")

# --------------------------------------------------------------------------------------------------------
# The team setup: what `start`, `status` and `stop` keep in --root


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port_db: int = 5432
    port_mlflow: int = 5000
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))


class Team:
    """The cluster, the server and their settings under ``root``: settings.json (ports, address),
    credentials.json (passwords, 0600), pg/ (the cluster), artifacts/, logs/, mlflow.pid."""

    def __init__(self, root: Path, os_user: str | None = None):
        self.root = root.resolve()
        self._os_user = os_user

    @property
    def settings_path(self) -> Path:
        return self.root / "settings.json"

    @property
    def credentials_path(self) -> Path:
        return self.root / "credentials.json"

    @property
    def pgpass_path(self) -> Path:
        return self.root / "pgpass"

    @property
    def pid_path(self) -> Path:
        return self.root / "mlflow.pid"

    def settings(self) -> Settings | None:
        if not self.settings_path.is_file():
            return None
        fix = (
            "delete it and run start again, naming the ports if not the defaults (--port-db, --port-mlflow); "
            "the data stays"
        )
        values = read_json(self.settings_path, fix)
        try:
            s = Settings(**values)
        except TypeError:
            raise TeamError(
                f"{self.settings_path} holds other keys than {[f.name for f in fields(Settings)]}: {fix}"
            ) from None
        if not all(isinstance(v, int) for v in (s.port_db, s.port_mlflow, s.workers)):
            raise TeamError(f"{self.settings_path}: port_db, port_mlflow and workers must be numbers: {fix}")
        return s

    def credentials(self) -> dict[str, str]:
        if not self.credentials_path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            values = {"admin": secrets.token_urlsafe(24), ROLE: secrets.token_urlsafe(24)}
            # Never there half-written (a crash between create and dump), never replaced: a second `start`
            # at the same moment keeps the first one's passwords.
            write_atomic(self.credentials_path, json.dumps(values, indent=1), mode=0o600, exclusive=True)
        if (self.root / "pg" / "data" / "PG_VERSION").is_file():
            fix = (
                f"restore it from a backup: the cluster in {self.root / 'pg'} checks these passwords "
                f"(or delete all of {self.root} to start afresh, which deletes its runs)"
            )
        else:
            fix = "delete it; no cluster uses it yet, and start makes new passwords"
        values = read_json(self.credentials_path, fix)
        if not all(isinstance(values.get(key), str) and values[key] for key in ("admin", ROLE)):
            raise TeamError(f"{self.credentials_path} lacks the passwords of admin and {ROLE}: {fix}")
        return values

    def postgres(self, s: Settings) -> Postgres:
        kwargs = {"os_user": self._os_user} if self._os_user else {}
        return Postgres(
            self.root / "pg", s.port_db, host=s.host, admin_password=self.credentials()["admin"], **kwargs
        )

    def mlflow_pid(self) -> int | None:
        """The process group of the running MLflow server, if this root started one that still runs."""
        if not self.pid_path.is_file():
            return None
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):  # gone, or an empty file from an older version killed mid-write
            return None
        return pid if "mlflow" in cmdline else None

    def public_host(self, s: Settings) -> str:
        return socket.getfqdn() if s.host in ("0.0.0.0", "::") else s.host

    def pgpass(self, s: Settings) -> Path:
        """The role's password for any host on ``s.port_db`` (mode 0600: libpq ignores a file others read)."""
        secret = self.credentials()[ROLE].replace("\\", "\\\\").replace(":", "\\:")
        write_atomic(self.pgpass_path, f"*:{s.port_db}:*:{ROLE}:{secret}\n", mode=0o600)
        return self.pgpass_path

    def exports(self, s: Settings) -> list[str]:
        """The lines to export, without a password: OPTUNA_STORAGE's is in the file PGPASSFILE names."""
        host = self.public_host(s)
        storage = self.postgres(s).url("optuna", ROLE, None, host=host)
        return [
            f"export MLFLOW_TRACKING_URI=http://{host}:{s.port_mlflow}",
            f"export OPTUNA_STORAGE={storage}",
            f"export PGPASSFILE={shlex.quote(str(self.pgpass(s)))}",
            *(f"export {key}={value}" for key, value in NO_TELEMETRY.items()),
        ]

    def start(self, requested: dict[str, Any]) -> Settings:
        saved = self.settings()
        if saved is not None:
            changed = {k: v for k, v in requested.items() if v is not None and getattr(saved, k) != v}
            if changed and (self.mlflow_pid() or self.postgres(saved).running()):
                now = ", ".join(f"{k}={getattr(saved, k)}" for k in changed)
                raise TeamError(
                    f"The team setup in {self.root} runs with {now}; stop it first to change that "
                    f"(python scripts/team_server.py stop --root {self.root})."
                )
            s = Settings(**(asdict(saved) | {k: v for k, v in requested.items() if v is not None}))
        else:
            s = Settings(**{k: v for k, v in requested.items() if v is not None})
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # PostgreSQL's user needs to pass through to pg/
        write_atomic(self.settings_path, json.dumps(asdict(s), indent=1))
        credentials = self.credentials()
        pg = self.postgres(s)
        if not pg.initialized():
            log(f"Creating a PostgreSQL {PG_MAJOR} cluster in {pg.data_dir}")
            pg.init()
        if pg.running():
            log(f"PostgreSQL already runs on port {s.port_db}")
        else:
            log(f"Starting PostgreSQL on {s.host}:{s.port_db}")
            pg.configure()  # this start's port and address, not the ones it was created with
            pg.start()
        pg.ensure_role(ROLE, credentials[ROLE])
        for database in DATABASES:
            pg.ensure_database(database, ROLE)

        server = MlflowServer(
            pg.url("mlflow", ROLE, credentials[ROLE]),
            self.root / "artifacts",
            s.port_mlflow,
            host=s.host,
            workers=s.workers,
            log_path=self.root / "logs" / "mlflow.log",
        )
        pid = self.mlflow_pid()
        if pid is not None:
            log(f"The MLflow server already runs (pid {pid}) at {server.uri}")
            wait_healthy(server.uri, 180)
        else:
            if port_in_use(s.port_mlflow, s.host):
                raise TeamError(f"Port {s.port_mlflow} is taken: choose another with --port-mlflow.")
            log(f"Starting the MLflow server at {server.uri} (log {server.log_path}); about 30 s")
            proc = server.start(wait=None)
            write_atomic(self.pid_path, str(proc.pid))
            seconds = wait_healthy(server.uri, 300, proc)
            log(f"The MLflow server answers after {seconds:.0f} s")
        log(
            f"Passwords: {self.credentials_path} (mode 0600). OPTUNA_STORAGE takes the role's from "
            f"PGPASSFILE={self.pgpass_path}; copy that file (or its line) to other machines (docs/team.md)."
        )
        if s.host not in LOOPBACK:
            log(
                f"WARNING: --host {s.host}: the MLflow server has no authentication. Anyone who reaches "
                "this port can read, change and delete every run. Put authentication in front first "
                "(docs/team.md)."
            )
        return s

    def stop(self) -> None:
        s = self.settings()
        if s is None:
            log(f"No team setup in {self.root}.")
            return
        pid = self.mlflow_pid()
        if pid is not None:
            log(f"Stopping the MLflow server (pid {pid})")
            stop_group(pid)
        self.pid_path.unlink(missing_ok=True)
        pg = self.postgres(s)
        if pg.running():
            log("Stopping PostgreSQL")
            pg.stop()

    def status(self) -> bool:
        s = self.settings()
        if s is None:
            log(f"No team setup in {self.root}: python scripts/team_server.py start")
            return False
        pg = self.postgres(s)
        db_up = pg.running()
        log(f"PostgreSQL {s.host}:{s.port_db} ({pg.data_dir}): {'running' if db_up else 'stopped'}")
        pid = self.mlflow_pid()
        uri = MlflowServer("", Path(), s.port_mlflow, host=s.host).uri
        healthy = False
        if pid is not None:
            try:
                wait_healthy(uri, 5)
                healthy = True
            except TeamError:
                pass
        state = "healthy" if healthy else ("starting or stuck" if pid else "stopped")
        log(f"MLflow server {uri} (pid {pid}): {state}")
        return db_up and healthy


@contextlib.contextmanager
def writers_setup(home: Path, workers: int) -> Iterator[str]:
    """What `writers` measures: a team setup in ``home`` made by `start` itself, on free ports (PostgreSQL
    durable, as its defaults are: fsync, synchronous_commit and full_page_writes on); its server's URI."""
    team = Team(home / "team")
    try:
        s = team.start({"port_db": free_port(), "port_mlflow": free_port(), "workers": workers})
        with team.postgres(s).connect() as conn:
            durable = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in DURABILITY}
        shown = ", ".join(f"{k}={v}" for k, v in durable.items())
        print(f"PostgreSQL {shown}; the MLflow server with {workers} workers", flush=True)
        yield f"http://127.0.0.1:{s.port_mlflow}"
    finally:
        team.stop()


# --------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="where the cluster, artifacts, logs live"
    )
    parser.add_argument("--pg-user", default=None, help="as root: the user PostgreSQL runs as (postgres)")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start (creating the first time) PostgreSQL and the MLflow server")
    start.add_argument("--host", default=None, help="address both listen on (default 127.0.0.1)")
    start.add_argument("--port-db", type=int, default=None, help="PostgreSQL's port (default 5432)")
    start.add_argument(
        "--port-mlflow", type=int, default=None, help="the MLflow server's port (default 5000)"
    )
    start.add_argument("--workers", type=int, default=None, help="MLflow server worker processes")
    sub.add_parser("status", help="what runs; prints the exports when everything does")
    sub.add_parser("stop", help="stop the MLflow server and PostgreSQL (the data stays)")
    writers = sub.add_parser("writers", help="measure concurrent writers on a new setup as start makes it")
    writers.add_argument("counts", type=int, nargs="+", help="numbers of concurrent writers, e.g. 8 16")
    writers.add_argument("--steps", type=int, default=100, help="metric batches per writer")
    writers.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    writers.add_argument("--uri", default=None, help="measure this running server instead")
    args = parser.parse_args(argv)
    try:
        if args.command == "writers":
            return cmd_writers(args, writers_setup)
        team = Team(args.root, os_user=args.pg_user)
        if args.command == "start":
            requested = {
                "host": args.host, "port_db": args.port_db, "port_mlflow": args.port_mlflow,
                "workers": args.workers,
            }  # fmt: skip
            s = team.start(requested)
            print("\n".join(team.exports(s)), flush=True)
            return 0
        if args.command == "status":
            up = team.status()
            s = team.settings()
            if up and s is not None:
                print("\n".join(team.exports(s)), flush=True)
            return 0 if up else 1
        team.stop()
        return 0
    except TeamError as err:
        log(f"team_server: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
