"""A one-node SLURM cluster on this machine, for trying and testing `hydra/launcher=slurm` (docs/slurm.md).

    eval "$(python scripts/slurm_cluster.py start)"    # prints: export SLURM_CONF=<root>/slurm.conf
    python scripts/slurm_cluster.py status
    python scripts/slurm_cluster.py stop                 # cancels the jobs, stops the daemons, deletes <root>

``start`` writes, under ``--root`` (default ``/tmp/alexnet-slurm``), a munge key, a ``slurm.conf`` for this
host alone (its CPUs and memory as ``slurmd -C`` reports them, one partition ``local``, free ports) and the
daemons' state, spool, logs and pid files; starts ``munged`` on its own socket there, ``slurmctld`` and
``slurmd``; waits until ``sinfo`` shows the node idle; and prints, on stdout and nothing else, the line to
export so that sbatch, squeue and scontrol find the cluster. Running it again reuses what runs and starts
what does not. Debian's packages: ``apt-get install slurm-wlm munge`` (or ``.ci/slurm-setup``).

slurmd starts every job as the user who submitted it, which only root can do: run this as root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "alexnet-slurm"
PARTITION = "local"
MARKER = "# written by scripts/slurm_cluster.py"  # stop deletes only a folder whose slurm.conf says this
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# Short waits for a test cluster: the seconds between SIGTERM and SIGKILL when a job is cancelled or
# requeued, and a requeued job's wait before it may start again (cred_expire + 1; SLURM's default is 121 s).
KILL_WAIT_S = 5
CRED_EXPIRE_S = 10


class SlurmError(RuntimeError):
    """Something a person can fix; printed as one line."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def binary(name: str) -> str:
    path = shutil.which(name, path=SBIN)
    if path is None:
        raise SlurmError(
            f"{name} not found: install SLURM and munge (apt-get install slurm-wlm munge; .ci/slurm-setup)."
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The cluster under ``root``: slurm.conf, munge/ (key, socket, pid, log), state/, spool/, log/."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.conf = self.root / "slurm.conf"
        self.munge = self.root / "munge"
        self.socket = self.munge / "munge.sock"
        if len(str(self.socket)) > 100:  # a Unix socket's path has at most 107 bytes
            raise SlurmError(f"--root {self.root} is too long for munge's socket path: choose a shorter one.")

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": SBIN}

    def export_line(self) -> str:
        return f"export SLURM_CONF={self.conf}"

    # --- the files ---------------------------------------------------------------------------------------

    def create(self) -> None:
        """The munge key and slurm.conf, the first time."""
        if self.conf.is_file():
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise SlurmError(
                f"{self.root} exists and holds no cluster of this script: choose another --root."
            )
        node = node_line()
        for folder in (self.root, self.munge, self.root / "state", self.root / "spool", self.root / "log"):
            folder.mkdir(parents=True, exist_ok=True)
            # munged refuses a socket in a folder that other users cannot enter, and a key in a folder they
            # can write to.
            os.chmod(folder, 0o755)
        # slurm.conf first: it is what marks the folder as this script's, for stop to delete.
        self.conf.write_text(slurm_conf(self.root, self.socket, node, free_port(), free_port()))
        self.munge_key()

    def munge_key(self) -> Path:
        key = self.munge / "munge.key"
        if not key.is_file():  # created 0600: munged refuses a key that others can read
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(os.urandom(1024))
        return key

    def node_name(self) -> str:
        found = re.search(r"^NodeName=(\S+)", self.conf.read_text(), re.MULTILINE)
        if found is None:
            raise SlurmError(f"{self.conf} has no NodeName line: run stop, then start again.")
        return found.group(1)

    # --- the daemons -------------------------------------------------------------------------------------

    def processes(self) -> Iterator[tuple[int, str]]:
        """(pid, name) of this cluster's daemons, job steps and jobs: slurmd and slurmctld are started with
        -f <slurm.conf>, munged with its socket in the folder; slurmstepd inherits slurmd's SLURM_CONF, and a
        job's processes (name ``job``) have it and a SLURM_JOB_ID."""
        conf_env = f"\0SLURM_CONF={self.conf}\0".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                name = Path(argv[0].decode(errors="replace").split(":")[0].strip()).name
                if name in DAEMONS and str(self.root).encode() in b" ".join(argv):
                    yield int(entry.name), name
                    continue
                environ = b"\0" + (entry / "environ").read_bytes() + b"\0"
                if conf_env in environ:
                    if name in DAEMONS:
                        yield int(entry.name), name
                    elif b"\0SLURM_JOB_ID=" in environ:
                        yield int(entry.name), "job"
            except OSError:  # gone meanwhile, or not ours to read
                continue

    def running(self) -> set[str]:
        return {name for _, name in self.processes()}

    def _daemon(self, *args: str) -> None:
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SlurmError(f"{Path(args[0]).name} did not start: {proc.stderr.strip()[-500:]}")

    def start(self, wait_s: float) -> None:
        if os.geteuid() != 0:
            raise SlurmError("slurmd starts jobs as their users, which only root can: run this as root.")
        for name in ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "scontrol"):
            binary(name)
        self.create()
        up = self.running()
        if {"munged", "slurmctld", "slurmd"} <= up:
            log(f"slurm_cluster: already runs in {self.root}")
        if "munged" not in up:
            m = self.munge
            self._daemon(
                binary("munged"), f"--socket={self.socket}", f"--key-file={self.munge_key()}",
                f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            )  # fmt: skip
            self._until(lambda: self.socket.exists(), 20, f"munged made no socket (log {m / 'munged.log'})")
        if "slurmctld" not in up:
            self._daemon(binary("slurmctld"), "-f", str(self.conf), "-i")  # -i: skip unreadable old state
            self._until(
                self._controller_up, 30, f"slurmctld did not answer (log {self.root}/log/slurmctld.log)"
            )
        if "slurmd" not in up:
            self._daemon(binary("slurmd"), "-f", str(self.conf), "-N", self.node_name())
        self._wait_idle(wait_s)
        started = sorted({"munged", "slurmctld", "slurmd"} - up)
        if started:
            log(f"slurm_cluster: started {', '.join(started)} in {self.root}")

    def _controller_up(self) -> bool:
        return "UP" in self._query("scontrol", "ping")

    def _query(self, *args: str) -> str:
        proc = subprocess.run(
            [binary(args[0]), *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def node_state(self) -> str:
        return self._query("sinfo", "-h", "-N", "-o", "%T")

    def _wait_idle(self, wait_s: float) -> None:
        """Until sinfo says idle (or busy with jobs: a rerun of start while jobs run)."""
        deadline, resumed = time.monotonic() + wait_s, False
        while time.monotonic() < deadline:
            state = self.node_state()
            if state in ("idle", "mixed", "allocated", "completing"):
                return
            if ("down" in state or "drain" in state) and not resumed:
                # A node that went away (a stop, a reboot) comes back down: it is this machine, take it back.
                self._query("scontrol", "update", f"NodeName={self.node_name()}", "State=RESUME")
                resumed = True
            time.sleep(0.5)
        raise SlurmError(
            f"the node is not idle after {wait_s:.0f} s (sinfo: {self.node_state() or 'no answer'}); see the "
            f"logs in {self.root}/log"
        )

    @staticmethod
    def _until(ready, wait_s: float, error: str) -> None:
        deadline = time.monotonic() + wait_s
        while not ready():
            if time.monotonic() > deadline:
                raise SlurmError(error)
            time.sleep(0.3)

    def stop(self) -> None:
        """Cancel every job, stop the daemons and job steps, delete the folder."""
        if self.conf.is_file() and MARKER not in self.conf.read_text():
            raise SlurmError(f"{self.conf} was not written by this script: not touching {self.root}.")
        if "slurmctld" in self.running():
            jobs = self._query("squeue", "-h", "-o", "%A").split()
            if jobs:
                self._query("scancel", *jobs)
                deadline = time.monotonic() + KILL_WAIT_S + 15
                while self._query("squeue", "-h", "-o", "%A") and time.monotonic() < deadline:
                    time.sleep(0.5)
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            pids = [pid for pid, _ in self.processes()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while any(True for _ in self.processes()) and time.monotonic() < deadline:
                time.sleep(0.2)
        left = sorted(self.processes())
        if left:
            raise SlurmError(f"these processes of the cluster did not end: {left}")
        if self.conf.is_file():
            shutil.rmtree(self.root)
            log(f"slurm_cluster: stopped, {self.root} deleted")


def node_line() -> str:
    """This host as `slurmd -C` sees it, reached on 127.0.0.1."""
    proc = subprocess.run([binary("slurmd"), "-C"], capture_output=True, text=True, timeout=60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("NodeName=")), None)
    if line is None:
        raise SlurmError(f"slurmd -C did not describe this host: {proc.stderr.strip()[-300:]}")
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"


def slurm_conf(root: Path, munge_socket: Path, node: str, ctld_port: int, slurmd_port: int) -> str:
    name = node.split()[0].split("=", 1)[1]
    user = "root"
    return f"""{MARKER}: a one-node test cluster; `stop` deletes this folder.
ClusterName=alexnet
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# No cgroups (containers, CI machines): processes are tracked by their parents, nothing is confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every 2 s, not every 30-60 s: a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
# Batch jobs can be requeued (scontrol requeue; submitit requeues a job that is preempted or times out).
JobRequeue=1
KillWait={KILL_WAIT_S}
# Patience for a loaded machine (a 2-core VM training in the background): SLURM's defaults, 10 s each, take
# a daemon that answers late for a failure and a batch script slow to start for a missing job.
MessageTimeout=60
BatchStartTimeout=120
SlurmdTimeout=600
ReturnToService=2
# No accounting database (slurmdbd): sacct answers nothing, and submitit then waits for its result files.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
{node}
PartitionName={PARTITION} Nodes={name} Default=YES MaxTime=INFINITE State=UP
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help=f"the cluster's folder ({DEFAULT_ROOT})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start (creating the first time) munged, slurmctld and slurmd")
    start.add_argument("--wait", type=float, default=60, help="seconds to wait for the node to be idle")
    sub.add_parser("status", help="prints the export line when the node is up (exit 1 otherwise)")
    sub.add_parser("stop", help="cancel the jobs, stop the daemons, delete the folder")
    args = parser.parse_args(argv)
    try:
        cluster = Cluster(args.root)
        if args.command == "start":
            cluster.start(args.wait)
            print(cluster.export_line(), flush=True)
            return 0
        if args.command == "status":
            up = cluster.running()
            state = cluster.node_state() if "slurmctld" in up else ""
            log(f"slurm_cluster: running {sorted(up) or 'nothing'}; node {state or 'unknown'}")
            ok = {"munged", "slurmctld", "slurmd"} <= up and state in ("idle", "mixed", "allocated")
            if ok:
                print(cluster.export_line(), flush=True)
            return 0 if ok else 1
        cluster.stop()
        return 0
    except SlurmError as err:
        log(f"slurm_cluster: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
