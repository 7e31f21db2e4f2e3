"""PostgreSQL and an MLflow tracking server as processes this machine runs: create, start, wait, stop.
scripts/team_server.py keeps a team setup of them; the tests make throwaway ones."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from team_files import TeamError, rewrite

PG_MAJOR = 15
DRIVER = "postgresql+psycopg"  # SQLAlchemy's dialect for psycopg 3 (pip install -e ".[team]")
ROLE = "alexnet"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bindir() -> Path:
    """Where initdb and pg_ctl are: $ALEXNET_PG_BIN, Debian's /usr/lib/postgresql/15/bin, or the PATH."""
    candidates = [os.environ.get("ALEXNET_PG_BIN"), f"/usr/lib/postgresql/{PG_MAJOR}/bin"]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise TeamError(
        f"PostgreSQL {PG_MAJOR} not found (no initdb/pg_ctl in /usr/lib/postgresql/{PG_MAJOR}/bin or on the "
        "PATH). Install it (apt-get install postgresql-15) or point ALEXNET_PG_BIN at its bin folder."
    )


def default_os_user() -> str | None:
    """The user PostgreSQL runs as: None (this process's user) unless this is root, which initdb refuses."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("ALEXNET_PG_USER", "postgres")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise TeamError(
            f"Running as root, PostgreSQL needs a non-root user to run as, and there is no user {name!r}. "
            "Create one (useradd --system postgres) or name another with --pg-user / ALEXNET_PG_USER."
        ) from None
    return name


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port)) == 0


def _listen_addresses(host: str) -> str:
    """PostgreSQL listens on ``host`` and always on 127.0.0.1, where the MLflow server connects."""
    if host in ("0.0.0.0", "::", "*"):
        return "*"
    return host if host in LOOPBACK else f"127.0.0.1,{host}"


CONF_MARK = "\n# scripts/team_server.py\n"  # what follows it in postgresql.conf is this script's
HBA_REMOTE = [
    "# scripts/team_server.py: other machines, with a password",
    "host all all 0.0.0.0/0 scram-sha-256",
    "host all all ::/0 scram-sha-256",
]


@dataclass
class Postgres:
    """One PostgreSQL cluster in ``home`` (data in ``home``/data, its log in ``home``/postgresql.log).

    ``admin_password`` None: every TCP connection is trusted (throwaway test clusters on 127.0.0.1 only);
    otherwise passwords are checked (scram-sha-256) and the superuser ``admin`` has that one.
    ``throwaway``: no fsync (a crash loses the cluster; for tests, where it is deleted anyway).
    """

    home: Path
    port: int
    host: str = "127.0.0.1"
    admin_password: str | None = None
    throwaway: bool = False
    admin: str = "admin"
    os_user: str | None = field(default_factory=default_os_user)
    bindir: Path = field(default_factory=pg_bindir)

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_path(self) -> Path:
        return self.home / "postgresql.log"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.os_user is not None:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise TeamError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> None:
        """initdb, as ``os_user``, and the server settings (address, port, no Unix socket)."""
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        if self.os_user is not None:
            entry = pwd.getpwnam(self.os_user)
            os.chown(self.home, entry.pw_uid, entry.pw_gid)
            probe = subprocess.run(
                ["runuser", "-u", self.os_user, "--", "test", "-w", str(self.home)], check=False
            )
            if probe.returncode != 0:
                raise TeamError(
                    f"PostgreSQL runs as {self.os_user}, who cannot reach {self.home} (a folder above it is "
                    "closed to other users). Choose another --root, e.g. under /srv or /tmp."
                )
        args = ["initdb", "-D", str(self.data_dir), "-U", self.admin, "-E", "UTF8", "--no-instructions"]
        pwfile = None
        if self.admin_password is None:
            args += ["--auth-host=trust", "--auth-local=trust"]
        else:
            # The password file must be readable by os_user; it is deleted right after initdb.
            pwfile = self.home / ".initdb-pw"
            pwfile.write_text(self.admin_password + "\n")
            os.chmod(pwfile, 0o600)
            if self.os_user is not None:
                entry = pwd.getpwnam(self.os_user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            args += ["--auth-host=scram-sha-256", "--auth-local=scram-sha-256", f"--pwfile={pwfile}"]
        if self.throwaway:
            args.append("--no-sync")
        try:
            self._run(*args)
        finally:
            if pwfile is not None:
                pwfile.unlink(missing_ok=True)
        self.configure()

    def configure(self) -> None:
        """Write the server settings (address, port, no Unix socket) into postgresql.conf, replacing those
        of an earlier start: the port and address are the ones of this start (`start --port-db N` after
        `stop`), not the ones the cluster was created with. Only while the cluster is stopped."""
        settings = {
            "listen_addresses": f"'{_listen_addresses(self.host)}'",
            "port": str(self.port),
            # No Unix socket: its path would have to be short and writable; every client uses TCP.
            "unix_socket_directories": "''",
            # Each MLflow worker's pool (up to POOL_SIZE + MAX_OVERFLOW), an engine per Optuna process, admin.
            "max_connections": "300",
        }
        if self.throwaway:  # tests only: a crash loses the cluster, which they delete anyway
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        conf = self.data_dir / "postgresql.conf"
        head = conf.read_text().partition(CONF_MARK)[0]
        ours = "".join(f"{key} = {value}\n" for key, value in settings.items())
        rewrite(conf, head + CONF_MARK + ours)
        hba = self.data_dir / "pg_hba.conf"
        lines = [line for line in hba.read_text().splitlines() if line not in HBA_REMOTE]
        if self.host not in LOOPBACK:  # other machines, with a password
            lines += HBA_REMOTE
        rewrite(hba, "\n".join(lines) + "\n")

    def running(self) -> bool:
        return (
            self.initialized()
            and self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0
        )

    def start(self) -> None:
        if self.running():
            return
        if port_in_use(self.port):
            raise TeamError(f"Port {self.port} is taken by another program: choose another with --port-db.")
        proc = self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if proc.returncode != 0:
            tail = self.log_path.read_text()[-2000:] if self.log_path.is_file() else proc.stderr
            raise TeamError(f"PostgreSQL did not start (log {self.log_path}):\n{tail}")

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.admin,
            password=self.admin_password,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
        )

    def ensure_role(self, name: str, password: str | None) -> None:
        from psycopg import sql

        with self.connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            statement = sql.SQL(verb + " ROLE {} LOGIN").format(sql.Identifier(name))
            if password is not None:
                statement += sql.SQL(" PASSWORD {}").format(sql.Literal(password))
            conn.execute(statement)

    def ensure_database(self, name: str, owner: str) -> None:
        from psycopg import sql

        with self.connect() as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner))
                )

    def require_password(self, role: str) -> None:
        """Connections as ``role`` must give its password even when the cluster trusts everyone else."""
        hba = self.data_dir / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256"
        if rule not in lines:
            hba.write_text("\n".join([f"# the role {role}: its password, always", rule, *lines]) + "\n")
            with self.connect() as conn:
                conn.execute("SELECT pg_reload_conf()")

    def url(self, database: str, role: str, password: str | None, host: str = "127.0.0.1") -> str:
        secret = f":{password}" if password is not None else ""
        return f"{DRIVER}://{role}{secret}@{host}:{self.port}/{database}"


# --------------------------------------------------------------------------------------------------------
# MLflow


def wait_healthy(uri: str, timeout: float = 180, proc: subprocess.Popen | None = None) -> float:
    """Wait until ``uri``/health answers 200; the seconds it took. Fails early when ``proc`` exits."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (OSError, urllib.error.URLError):
            pass
        if proc is not None and proc.poll() is not None:
            raise TeamError(f"the MLflow server at {uri} exited ({proc.returncode}) before it answered")
        if time.monotonic() - start > timeout:
            raise TeamError(f"the MLflow server at {uri} did not answer within {timeout:.0f} s")
        time.sleep(0.3)


# MLflow's telemetry off, in the server and the jobs (`start` exports it): offline, its thread fails to fetch
# its config and then takes a variable out of os.environ while a request reads os.environ for proxies, which
# fails that request, unretried ("failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'": 2 of 32 writers).
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true"}
# A server worker runs up to 40 requests at once (anyio's threads under uvicorn); SQLAlchemy's default pool of
# 15 connections made requests wait 30 s and fail with 400 ("QueuePool limit of size 5 overflow 10 reached"),
# unretried, at 64 writers. 40 connections a worker: none waits for one (docs/team.md, writers).
SERVER_DEFAULTS = {
    "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "20", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "20", **NO_TELEMETRY
}  # fmt: skip


@dataclass
class MlflowServer:
    """``mlflow server`` on ``backend_uri`` (a database URL, given through the environment), storing
    artifacts in ``artifacts_dir`` (it serves them: clients need no access to that folder)."""

    backend_uri: str
    artifacts_dir: Path
    port: int
    host: str = "127.0.0.1"
    workers: int = 1
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
            "--artifacts-destination", str(self.artifacts_dir),
        ]  # fmt: skip

    def start(self, wait: float | None = 180) -> subprocess.Popen:
        """Start it in its own session (a later ``stop`` ends the whole process group: uvicorn and its
        workers), logging to ``log_path``; with ``wait``, return once it answers."""
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **SERVER_DEFAULTS,  # unless the environment says otherwise
            **os.environ,
            "MLFLOW_BACKEND_STORE_URI": self.backend_uri,  # not argv: `ps` shows argv to everyone
            # No GenAI job runner: one process less, and nothing of it is used here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONWARNINGS": "ignore",
        }
        for key in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"):
            env.pop(key, None)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("ab")
            os.chmod(self.log_path, 0o600)
        else:
            out = subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.command(), env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        if wait:
            wait_healthy(self.uri, wait, self.proc)
        return self.proc

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        stop_group(self.proc.pid, timeout, self.proc)
        self.proc = None

    def restart(self, wait: float = 180) -> float:
        """Stop, start again on the same port; the seconds it was unreachable."""
        start = time.monotonic()
        self.stop()
        self.start(wait=wait)
        return time.monotonic() - start


def stop_group(pid: int, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM to the process group that ``pid`` leads (uvicorn lets the requests in flight finish), SIGKILL
    after ``timeout`` seconds; returns once no process of the group is left. ``proc``: the leader, when it
    is this process's child (to reap it)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()  # a child that exited stays a zombie, and in the group, until reaped
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=10)
