"""The team setup on one machine: PostgreSQL 15, an MLflow tracking server on it, an Optuna storage on it.

    python scripts/team_server.py start     # or: eval "$(python scripts/team_server.py start)"
    python scripts/team_server.py status
    python scripts/team_server.py stop
    python scripts/team_server.py writers 8 16     # concurrent writers the server takes (docs/team.md)

``start`` creates (the first time) a PostgreSQL cluster under ``--root`` (default ``.team/`` at the project
root), a role ``alexnet`` with a generated password and two databases, ``mlflow`` and ``optuna``; starts
PostgreSQL and ``mlflow server`` (artifacts under ``--root``/artifacts), both bound to 127.0.0.1 unless
``--host`` says otherwise; waits until the server answers; and prints, on stdout and nothing else, the two
lines to export:

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    export OPTUNA_STORAGE=postgresql+psycopg://alexnet:<password>@127.0.0.1:5432/optuna

Running ``start`` again reuses what runs. The passwords live in ``--root``/credentials.json (mode 0600); the
MLflow server gets its database URL through its environment, never its command line (which ``ps`` shows to
every user of the machine). Progress and errors go to stderr.

PostgreSQL refuses to run as root: as root, the cluster belongs to and runs as the user ``postgres``
(``--pg-user``), through ``runuser``.

The tests (tests/test_team_server.py) use the same functions for throwaway clusters and servers:
``Postgres``, ``MlflowServer``, ``wait_healthy``, ``free_port``, ``measure_writers``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import pwd
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT / ".team"
PG_MAJOR = 15
DRIVER = "postgresql+psycopg"  # SQLAlchemy's dialect for psycopg 3 (pip install -e ".[team]")
ROLE = "alexnet"
DATABASES = ("mlflow", "optuna")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class TeamError(RuntimeError):
    """Something a person can fix; printed as one line."""


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
        settings = {
            "listen_addresses": f"'{_listen_addresses(self.host)}'",
            "port": str(self.port),
            # No Unix socket: its path would have to be short and writable; every client uses TCP.
            "unix_socket_directories": "''",
            "max_connections": "200",  # MLflow workers' pools + one engine per Optuna process
        }
        if self.throwaway:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# scripts/team_server.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        if self.host not in LOOPBACK:
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write("# scripts/team_server.py: other machines, with a password\n")
                hba.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")

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
    def pid_path(self) -> Path:
        return self.root / "mlflow.pid"

    def settings(self) -> Settings | None:
        if not self.settings_path.is_file():
            return None
        return Settings(**json.loads(self.settings_path.read_text()))

    def credentials(self) -> dict[str, str]:
        if not self.credentials_path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            values = {"admin": secrets.token_urlsafe(24), ROLE: secrets.token_urlsafe(24)}
            fd = os.open(self.credentials_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(values, f, indent=1)
        return json.loads(self.credentials_path.read_text())

    def postgres(self, s: Settings) -> Postgres:
        kwargs = {"os_user": self._os_user} if self._os_user else {}
        return Postgres(
            self.root / "pg", s.port_db, host=s.host, admin_password=self.credentials()["admin"], **kwargs
        )

    def mlflow_pid(self) -> int | None:
        """The process group of the running MLflow server, if this root started one that still runs."""
        if not self.pid_path.is_file():
            return None
        pid = int(self.pid_path.read_text().strip())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        return pid if "mlflow" in cmdline else None

    def public_host(self, s: Settings) -> str:
        return socket.getfqdn() if s.host in ("0.0.0.0", "::") else s.host

    def exports(self, s: Settings) -> list[str]:
        host = self.public_host(s)
        storage = self.postgres(s).url("optuna", ROLE, self.credentials()[ROLE], host=host)
        return [
            f"export MLFLOW_TRACKING_URI=http://{host}:{s.port_mlflow}",
            f"export OPTUNA_STORAGE={storage}",
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
        self.settings_path.write_text(json.dumps(asdict(s), indent=1))
        credentials = self.credentials()
        pg = self.postgres(s)
        if not pg.initialized():
            log(f"Creating a PostgreSQL {PG_MAJOR} cluster in {pg.data_dir}")
            pg.init()
        if pg.running():
            log(f"PostgreSQL already runs on port {s.port_db}")
        else:
            log(f"Starting PostgreSQL on {s.host}:{s.port_db}")
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
            self.pid_path.write_text(str(proc.pid))
            seconds = wait_healthy(server.uri, 300, proc)
            log(f"The MLflow server answers after {seconds:.0f} s")
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


# --------------------------------------------------------------------------------------------------------
# How many concurrent writers the server takes


@dataclass
class WriterResult:
    index: int
    run_id: str | None = None
    seconds: float = 0.0
    requests: int = 0
    max_latency: float = 0.0
    error: str | None = None


def _writer(uri: str, experiment_id: str, index: int, steps: int, ready, go, results) -> None:
    """One training job's traffic: create a run, params, tags, a config.yaml artifact, then each step a
    batch of four metrics (what Lightning's MLFlowLogger sends), then the end of the run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # no "View run ..." lines per writer
    result = WriterResult(index)
    client = MlflowClient(uri)
    ready.put(index)
    go.wait()
    start = time.monotonic()

    def timed(call, *args, **kwargs):
        t = time.monotonic()
        value = call(*args, **kwargs)
        result.requests += 1
        result.max_latency = max(result.max_latency, time.monotonic() - t)
        return value

    try:
        run = timed(client.create_run, experiment_id, tags={"writer": str(index)})
        result.run_id = run.info.run_id
        timed(client.log_batch, run.info.run_id, params=[Param(f"p{i}", str(i * index)) for i in range(20)])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(f"writer: {index}\n" * 200)
            timed(client.log_artifact, run.info.run_id, str(path))
        for step in range(steps):
            now = int(time.time() * 1000)
            metrics = [Metric(f"m{k}", float(step * 10 + k), now, step) for k in range(4)]
            timed(client.log_batch, run.info.run_id, metrics=metrics)
        timed(client.set_terminated, run.info.run_id, "FINISHED")
    except Exception as err:  # noqa: BLE001 - reported, counted as a failed writer
        result.error = f"{type(err).__name__}: {err}"[:500]
    result.seconds = time.monotonic() - start
    results.put(asdict(result))


def measure_writers(
    uri: str, writers: int, steps: int = 100, experiment: str | None = None
) -> dict[str, Any]:
    """``writers`` processes write to the server at once (each started and connected before the first
    request); then every run, param, metric point and artifact is read back. Returns the counts."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    name = experiment or f"writers-{writers}-{int(time.time())}"
    experiment_id = client.create_experiment(name)
    # Spawned processes import this module by its name: from this folder (imported, not run, e.g. by tests).
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.append(here)
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_writer, args=(uri, experiment_id, i, steps, ready, go, results))
        for i in range(writers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        try:
            ready.get(timeout=600)
        except queue.Empty:
            for p in procs:
                p.kill()
            raise TeamError("a writer process did not start (its error is above)") from None
    start = time.monotonic()
    go.set()
    done = [WriterResult(**results.get(timeout=1800)) for _ in procs]
    wall = time.monotonic() - start
    for p in procs:
        p.join(timeout=60)

    # Read everything back through a fresh client.
    runs = client.search_runs([experiment_id], max_results=10_000)
    found = duplicated = 0
    for run in runs:
        for k in range(4):
            history = client.get_metric_history(run.info.run_id, f"m{k}")
            good = {(m.step, m.value) for m in history if m.value == m.step * 10 + k and 0 <= m.step < steps}
            found += len(good)
            duplicated += len(history) - len({(m.step, m.value) for m in history})
    incomplete = [
        r.info.run_id
        for r in runs
        if r.info.status != "FINISHED"
        or len(r.data.params) != 20
        or [a.path for a in client.list_artifacts(r.info.run_id)] != ["config.yaml"]
    ]
    requests = sum(r.requests for r in done)
    expected = writers * steps * 4
    return {
        "writers": writers,
        "steps": steps,
        "runs_found": len(runs),
        "points_expected": expected,
        "points_found": found,
        "points_lost": expected - found,
        "points_duplicated": duplicated,
        "incomplete_runs": len(incomplete),
        "errors": [r.error for r in done if r.error],
        "requests": requests,
        "seconds": round(wall, 1),
        "requests_per_s": round(requests / wall, 1),
        "max_latency_s": round(max((r.max_latency for r in done), default=0.0), 2),
        "experiment": name,
    }


def throwaway_setup(home: Path, workers: int) -> tuple[Postgres, MlflowServer]:
    """A new cluster in ``home`` (trusting 127.0.0.1, no fsync) and a server on it, both running."""
    pg = Postgres(home / "pg", free_port(), throwaway=True)
    pg.init()
    pg.start()
    pg.ensure_role(ROLE, None)
    pg.ensure_database("mlflow", ROLE)
    server = MlflowServer(
        pg.url("mlflow", ROLE, None), home / "artifacts", free_port(), workers=workers,
        log_path=home / "mlflow.log",
    )  # fmt: skip
    server.start()
    return pg, server


def cmd_writers(args: argparse.Namespace) -> int:
    home = Path(tempfile.mkdtemp(prefix="alexnet-writers-"))
    os.chmod(home, 0o711)
    pg = server = None
    try:
        if args.uri:
            uri = args.uri
        else:
            log(f"A throwaway PostgreSQL cluster and MLflow server ({args.workers} workers) in {home}")
            pg, server = throwaway_setup(home, args.workers)
            uri = server.uri
        for n in args.counts:
            log(f"{n} concurrent writers, {args.steps} steps each ...")
            result = measure_writers(uri, n, args.steps)
            print(json.dumps(result), flush=True)
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


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
    writers = sub.add_parser("writers", help="measure concurrent writers on a throwaway cluster and server")
    writers.add_argument("counts", type=int, nargs="+", help="numbers of concurrent writers, e.g. 8 16")
    writers.add_argument("--steps", type=int, default=100, help="metric batches per writer")
    writers.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    writers.add_argument("--uri", default=None, help="measure this running server instead")
    args = parser.parse_args(argv)
    try:
        if args.command == "writers":
            return cmd_writers(args)
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
