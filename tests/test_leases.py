"""Two machines, one store: a job leaves a run that another live job holds alone (one line, a skip), takes
over a run whose machine died once its lease expired, and resumes it from the checkpoint the dead machine
left in the store. "Machines" are processes that say they are another host (ALEXNET_HOST) and keep their own
folders; the store is a SQLite file, and (slow) a real `mlflow server`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from alexnet import lease

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "data.synthetic_size=64", "logger.checkpoint_artifact=true"]


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.slow)])
def store(request, tmp_path: Path):
    """A tracking URI and an experiment in it: a SQLite file, or an `mlflow server` on a free port."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        yield uri, MlflowClient(uri).create_experiment("leases")
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import team_services

    server = team_services.MlflowServer(
        f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", team_services.free_port()
    )
    server.start(wait=300)
    try:
        yield server.uri, MlflowClient(server.uri).create_experiment("leases")
    finally:
        server.stop()


def as_host(monkeypatch, name: str) -> None:
    monkeypatch.setenv(lease.HOST_ENV, name)


def holder_tag(host: str, beat_age: float, seconds: float = 1.0, pid: int = 4242) -> str:
    now = time.time()
    return json.dumps({"host": host, "pid": pid, "since": now - 100, "beat": now - beat_age,
                       "seconds": seconds, "token": "theirs"})  # fmt: skip


def test_a_live_lease_is_left_alone_and_an_expired_one_taken_over(store, monkeypatch):
    uri, exp = store
    client = MlflowClient(uri)
    as_host(monkeypatch, "machine-b")
    run = client.create_run(
        exp, tags={"run_key": "k", "attempts": "1", lease.LEASE_TAG: holder_tag("machine-a", 1)}
    )
    run_id = run.info.run_id

    mine = lease.Lease(uri, seconds=1)
    with pytest.raises(lease.Held, match=r"is held by machine-a pid 4242 since \d{4}-\d\d-\d\d .* UTC"):
        lease.take_over(client, client.get_run(run_id), mine)
    left = client.get_run(run_id)
    assert left.data.tags["attempts"] == "1" and lease.Holder.of(left).token == "theirs"  # untouched

    client.set_tag(run_id, lease.LEASE_TAG, holder_tag("machine-a", 3.5))  # 3 beats of 1 s missed: dead
    lease.take_over(client, client.get_run(run_id), mine)
    taken = client.get_run(run_id)
    assert taken.info.status == "RUNNING" and taken.data.tags["attempts"] == "2"
    assert taken.data.tags["host"] == "machine-b"
    assert lease.Holder.of(taken).token == mine.token and lease.Holder.of(taken).host == "machine-b"


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(store, monkeypatch):
    uri, exp = store
    client = MlflowClient(uri)
    as_host(monkeypatch, "machine-a")
    mine = lease.Lease(uri, seconds=0.3)
    mine.run_id = client.create_run(exp, tags={lease.LEASE_TAG: mine.value()}).info.run_id
    first = lease.Holder.of(client.get_run(mine.run_id)).beat
    mine.start()
    try:
        time.sleep(1.5)
        assert lease.Holder.of(client.get_run(mine.run_id)).beat > first  # beating
        assert mine.lost is None
        client.set_tag(mine.run_id, lease.LEASE_TAG, holder_tag("machine-b", 0))  # B took the run over
        deadline = time.monotonic() + 20
        while mine.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mine.lost is not None and "machine-b" in mine.lost
        with pytest.raises(lease.LeaseLost, match="lost its lease"):
            mine.check()
    finally:
        mine.release()
    assert lease.Holder.of(client.get_run(mine.run_id)).token == "theirs"  # B's lease stays

    other = lease.Lease(uri, seconds=0.3)
    other.run_id = client.create_run(exp, tags={lease.LEASE_TAG: other.value()}).info.run_id
    other.start()
    other.release()
    assert lease.LEASE_TAG not in client.get_run(other.run_id).data.tags  # released: free at once


def test_a_dead_process_on_this_machine_frees_its_lease_at_once(monkeypatch):
    as_host(monkeypatch, "machine-a")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    dead = lease.Holder("machine-a", gone.pid, now, now, 60.0, "t")
    alive = lease.Holder("machine-a", os.getppid(), now, now, 60.0, "t")
    elsewhere = lease.Holder("machine-b", gone.pid, now, now, 60.0, "t")  # its pid means nothing here
    assert dead.expired() and not alive.expired() and not elsewhere.expired()
    assert elsewhere.expired(now + 181)


def test_a_requeued_slurm_job_takes_its_own_lease_over_at_once_on_any_node(monkeypatch):
    as_host(monkeypatch, "node-2")
    now = time.time()
    first_attempt = lease.Holder("node-1", 4242, now, now, 60.0, "t", slurm=["81", 0])
    monkeypatch.setenv("SLURM_JOB_ID", "81")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # scontrol requeue 81: the same job, attempt 2
    assert first_attempt.expired()
    assert not lease.Holder("node-1", 4242, now, now, 60.0, "t", slurm=["80", 0]).expired()  # another job
    assert not lease.Holder("node-1", 4242, now, now, 60.0, "t", slurm=["81", 1]).expired()  # this attempt's
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert not first_attempt.expired()  # SLURM's first attempt of 81 cannot be gone while it asks
    held = lease.Lease("sqlite://", 60.0)
    assert json.loads(held.value())["slurm"] == ["81", 0]


def test_two_machines_creating_one_configuration_keep_one_run(store, monkeypatch):
    uri, exp = store
    client = MlflowClient(uri)
    as_host(monkeypatch, "machine-b")
    first = client.create_run(exp, tags={"run_key": "k", lease.LEASE_TAG: holder_tag("machine-a", 0)})
    time.sleep(0.01)
    mine = lease.Lease(uri, seconds=1)
    mine.run_id = client.create_run(exp, tags={"run_key": "k", lease.LEASE_TAG: mine.value()}).info.run_id
    with pytest.raises(
        lease.Held, match=f"run {first.info.run_id} .* created at the same moment by machine-a"
    ):
        lease.keep_first(client, exp, "k", mine)
    assert client.get_run(mine.run_id).info.lifecycle_stage == "deleted"
    assert client.get_run(first.info.run_id).info.lifecycle_stage == "active"


# --- Two machines, end to end -------------------------------------------------------------------------------


class Machine:
    """`python src/train.py` as one machine of the team: its own host name and folders, the shared store."""

    def __init__(self, name: str, home: Path, uri: str, artifacts: Path):
        self.name, self.home, self.uri, self.artifacts = name, home, uri, artifacts

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    def command(self, *overrides: str) -> tuple[list[str], dict[str, str]]:
        args = [
            sys.executable, str(ROOT / "src" / "train.py"), f"logger.tracking_uri={self.uri}",
            f"logger.artifact_location={self.artifacts}", f"hydra.run.dir={self.home / 'run'}",
            f"paths.checkpoint_dir={self.checkpoints}", f"paths.cache_dir={self.home / 'cache'}", *overrides,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONWARNINGS": "ignore", lease.HOST_ENV: self.name}
        env.pop("MLFLOW_TRACKING_URI", None)
        return args, env

    def start(self, *overrides: str) -> subprocess.Popen:
        args, env = self.command(*overrides)
        return subprocess.Popen(args, cwd=self.home, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def run(self, *overrides: str) -> subprocess.CompletedProcess:
        args, env = self.command(*overrides)
        proc = subprocess.run(args, cwd=self.home, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{self.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc


def steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        assert proc.poll() is None, f"machine A ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)
    return found


@pytest.mark.slow  # timing: A must still be training when B has started; under load B can start too late
def test_machine_b_skips_a_live_run_then_takes_it_over_from_the_store(tmp_path: Path, monkeypatch):
    """A trains; B (another host, its own folders, the same store) finds A's lease live and skips in one line,
    touching nothing. A is killed (SIGKILL); once its lease expires, B takes the run over, downloads A's last
    checkpoint from the store and finishes it: one run, one curve, attempts=2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    shared = tmp_path / "mlartifacts"
    machines = {name: Machine(name, tmp_path / name, uri, shared) for name in ("machine-a", "machine-b")}
    for machine in machines.values():
        machine.home.mkdir()
    job = [
        *SMOKE,
        "trainer.max_epochs=30",  # A must still be training when B, started under load, looks
        "logger.lease_seconds=1",
    ]
    a, b = machines["machine-a"], machines["machine-b"]
    proc = a.start(*job)
    try:

        def a_run():
            exp = client.get_experiment_by_name("smoke")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return next((r for r in runs if lease.LEASE_TAG in r.data.tags), None)

        run_id = wait_for("a run with a lease", a_run, proc).info.run_id
        skipped = b.run(*job)
        output = skipped.stdout + skipped.stderr
        lines = [line for line in output.splitlines() if "Skipped:" in line]
        assert len(lines) == 1, output[-3000:]
        assert (
            f"Skipped: run {run_id} of this configuration is held by machine-a pid {proc.pid} since"
            in lines[0]
        )
        assert "MLflow run" not in output and not b.checkpoints.joinpath(run_id).exists()
        assert proc.poll() is None, "A finished before B looked: raise trainer.max_epochs"
        left = client.get_run(run_id)
        assert left.info.status == "RUNNING" and left.data.tags["attempts"] == "1"
        assert lease.Holder.of(left).host == "machine-a"

        def aligned():  # A's checkpoint in the store holds every epoch A logged: B then repeats none
            run = client.get_run(run_id)
            manifest = json.loads(run.data.tags.get("alexnet.checkpoint", "null"))
            logged = steps(client, run_id, "train/loss")
            return manifest if manifest and logged and logged[-1][0] == manifest["step"] - 1 else None

        manifest = wait_for("an up-to-date checkpoint in the store", aligned, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = steps(client, run_id, "val/top1_err")
    as_host(monkeypatch, "machine-b")
    deadline = time.monotonic() + 60
    while not lease.Holder.of(client.get_run(run_id)).expired():  # 3 missed beats of 1 s
        assert time.monotonic() < deadline
        time.sleep(0.2)

    resumed = b.run(*job)
    assert "Downloaded the last checkpoint" in resumed.stdout + resumed.stderr
    exp = client.get_experiment_by_name("smoke")
    (run,) = client.search_runs([exp.experiment_id])  # one run: B's job went on in A's
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["attempts"] == "2" and run.data.tags["host"] == "machine-b"
    assert run.data.tags["resumed_from"] == str(b.checkpoints / run_id / "last.ckpt")
    assert lease.LEASE_TAG not in run.data.tags  # released at the end
    assert (b.checkpoints / run_id / "best.ckpt").is_file()
    for key in ("val/top1_err", "train/loss"):
        curve = steps(client, run_id, key)
        assert [s for s, _ in curve] == list(range(12)), f"{key}: one point per epoch, none twice: {curve}"
    assert steps(client, run_id, "val/top1_err")[: len(before)] == before  # A's epochs, kept as they were
    assert len(before) == manifest["step"]  # B went on from A's last epoch, not from the start
    assert "test/top1_err_1crop" in run.data.metrics
