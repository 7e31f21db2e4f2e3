"""SLURM for real: a one-node cluster (scripts/slurm_cluster.py: Debian's slurm-wlm and munge in a temporary
folder) and the LRN ablation sweep sent through it by `hydra/launcher=slurm` (the project's settings on top
of submitit's `submitit_slurm`), its jobs requeued mid-run.

The sweep's runs go to the team server (scripts/team_server.py: PostgreSQL and `mlflow server`) when
PostgreSQL is installed, else to an `mlflow server` on a SQLite file. Needs root and slurm-wlm
(`.ci/slurm-setup` installs it): skipped without them, failed instead when ALEXNET_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import scratch
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
SCRIPTS = ROOT / "scripts"
CLUSTER = SCRIPTS / "slurm_cluster.py"
TEAM = SCRIPTS / "team_server.py"

sys.path.insert(0, str(SCRIPTS))  # as when the scripts run: their modules beside them
import team_services  # noqa: E402

_spec = importlib.util.spec_from_file_location("slurm_cluster", CLUSTER)
slurm_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slurm_cluster)


def _missing() -> str | None:
    for name in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol"):
        if shutil.which(name, path=slurm_cluster.SBIN) is None:
            return f"{name} not found (apt-get install slurm-wlm munge, or .ci/slurm-setup)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed (pip install -e '.[team]')"
    return None


_MISSING = _missing()
if _MISSING and os.environ.get("ALEXNET_REQUIRE_SLURM") == "1":  # CI with SLURM: fail, not skip quietly
    raise RuntimeError(f"ALEXNET_REQUIRE_SLURM=1 but SLURM cannot run here: {_MISSING}")
needs_slurm = pytest.mark.skipif(_MISSING is not None, reason=f"no SLURM: {_MISSING}")


def cluster_cmd(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CLUSTER), "--root", str(root), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@contextmanager
def one_node_cluster(root: Path) -> Iterator[dict[str, str]]:
    """`slurm_cluster.py start`, its export in the environment; `stop` after, whatever happened."""
    try:
        started = cluster_cmd(root, "start")
        assert started.returncode == 0, started.stderr
        name, value = started.stdout.strip().removeprefix("export ").split("=", 1)
        yield {name: value}
    finally:
        stopped = cluster_cmd(root, "stop")
    assert stopped.returncode == 0, stopped.stderr  # not in finally: a failure inside stays the one reported


def slurm(env: dict[str, str], *args: str) -> str:
    full = {**os.environ, **env, "PATH": slurm_cluster.SBIN}
    return subprocess.run(args, env=full, capture_output=True, text=True, check=True, timeout=60).stdout


@contextmanager
def tracking_server(home: Path) -> Iterator[str]:
    """The team server when PostgreSQL is installed, else `mlflow server` on SQLite: its URI."""
    try:
        team_services.pg_bindir()
        team_services.default_os_user()
        team = True
    except team_services.TeamError:
        team = False
    if team:
        command = [sys.executable, str(TEAM), "--root", str(home / "team")]
        ports = ["--port-db", str(team_services.free_port()), "--port-mlflow", str(team_services.free_port())]
        started = subprocess.run([*command, "start", *ports], capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        print("tracking: the team server (PostgreSQL + mlflow server)")
        try:
            yield exports["MLFLOW_TRACKING_URI"]
        finally:
            subprocess.run([*command, "stop"], capture_output=True, text=True, timeout=300)
        return
    server = team_services.MlflowServer(
        f"sqlite:///{home / 'mlflow.db'}", home / "artifacts", team_services.free_port(),
        log_path=home / "mlflow.log",
    )  # fmt: skip
    server.start()
    print("tracking: mlflow server on SQLite (no PostgreSQL here)")
    try:
        yield server.uri
    finally:
        server.stop()


def training_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=100) if "run_key" in r.data.tags]


def steps(client: MlflowClient, run, key: str = "val/top1_err") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


# --- The script --------------------------------------------------------------------------------------------


def test_stop_leaves_a_folder_it_did_not_make_alone(tmp_path: Path):
    (tmp_path / "slurm.conf").write_text("ClusterName=production\n")
    stopped = cluster_cmd(tmp_path, "stop")
    assert stopped.returncode == 1 and len(stopped.stderr.strip().splitlines()) == 1, stopped.stderr
    assert "not written by this script" in stopped.stderr and (tmp_path / "slurm.conf").is_file()


@needs_slurm
def test_cluster_starts_once_runs_a_job_and_stops_clean():
    """start: the node idle and the export on stdout; again: reused; a batch job runs; stop: no daemon left,
    the folder gone; stop again: nothing to do."""
    with scratch("slurm-", 0o755) as home:
        root = home / "c"
        with one_node_cluster(root) as env:
            assert env == {"SLURM_CONF": str(root / "slurm.conf")}
            assert slurm(env, "sinfo", "-h", "-o", "%P %T").split() == [f"{slurm_cluster.PARTITION}*", "idle"]
            again = cluster_cmd(root, "start", timeout=30)
            assert again.returncode == 0 and again.stdout.strip() == f"export SLURM_CONF={env['SLURM_CONF']}"
            assert "already runs" in again.stderr
            out = home / "job.out"
            slurm(
                env, "sbatch", "--wait", f"--output={out}", "--wrap", "echo job $SLURM_JOB_ID on $(hostname)"
            )
            assert out.read_text().startswith("job 1 on ")
            status = cluster_cmd(root, "status")
            assert status.returncode == 0 and status.stdout.strip() == again.stdout.strip()
            running = {name for _, name in slurm_cluster.Cluster(root).processes()}
            assert running >= {"munged", "slurmctld", "slurmd"}
        assert not root.exists()
        assert list(slurm_cluster.Cluster(root).processes()) == []
        assert cluster_cmd(root, "stop").returncode == 0
        assert cluster_cmd(root, "status").returncode == 1


# --- The sweep through SLURM -------------------------------------------------------------------------------


def after_first_epoch(client, experiment: str, env: dict[str, str], proc, skip: set[str]) -> tuple[str, str]:
    """The first run not in ``skip`` that has logged an epoch, and its SLURM job: (run id, job id)."""
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, "the sweep ended before its jobs could be requeued"
        assert time.monotonic() < deadline, "no job logged an epoch"
        runs = [r for r in training_runs(client, experiment) if r.info.run_id not in skip]
        logged = [r for r in runs if steps(client, r)]
        if logged:
            break
        time.sleep(0.5)
    run = logged[0]
    num = run.data.tags["hydra_job_num"]  # the job's index in the sweep: its SLURM array task
    (job,) = [j for j in slurm(env, "squeue", "-h", "-r", "-o", "%i").split() if j.endswith(f"_{num}")]
    return run.info.run_id, job


def evidence(env: dict[str, str], folder: Path, log_path: Path) -> str:
    """What SLURM and the jobs say, for a failure message."""
    parts = []
    for args in (["squeue", "-a", "-r", "-o", "%i %T %r %M"], ["sinfo", "-R"], ["scontrol", "show", "job"]):
        try:
            parts.append(f"$ {' '.join(args)}\n{slurm(env, *args)}")
        except subprocess.SubprocessError as err:
            parts.append(f"$ {' '.join(args)}: {err}")
    for path in sorted((folder / "multirun" / ".submitit").glob("*/*_log.*")) + [log_path]:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if "sacct" not in ln]
        parts.append(f"--- {path.name}\n" + "\n".join(lines[-15:]))
    return "\n".join(parts)


@needs_slurm
@pytest.mark.slow
def test_lrn_sweep_through_slurm_resumes_requeued_jobs():
    """`python src/train.py -m hydra/launcher=slurm +ablation=lrn experiment=smoke seed=1`: 2 SLURM jobs of 4
    epochs, each requeued after its first epoch. One by `scontrol requeue` (an administrator, or preemption:
    SIGTERM, then the job starts again); the other by submitit itself on SIGUSR2 (what SLURM sends
    signal_delay_s before the time limit, `scancel --signal=USR2` here): it requeues its own job. Either way
    SLURM runs the same job again and resume=auto continues its MLflow run from its last checkpoint: both
    runs end FINISHED, one run per config, attempts=2, every epoch of the curve once."""
    start = time.monotonic()
    with scratch("slurm-", 0o755) as home, one_node_cluster(home / "c") as env, tracking_server(home) as uri:
        experiment = "slurm-lrn"
        folder = home / "sweep"
        folder.mkdir()
        args = [
            sys.executable, str(TRAIN), "-m", "hydra/launcher=slurm", "+ablation=lrn", "experiment=smoke",
            "seed=1", f"logger.experiment_name={experiment}", "trainer.max_epochs=4",
            "data.synthetic_size=512",
            # This node has no GPU and little memory: the job asks for what it has.
            "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=20",
            f"hydra.sweep.dir={folder / 'multirun'}", f"paths.checkpoint_dir={folder / 'checkpoints'}",
            f"paths.cache_dir={folder / 'cache'}",
        ]  # fmt: skip
        run_env = {**os.environ, **env, "MLFLOW_TRACKING_URI": uri, "PYTHONWARNINGS": "ignore"}
        run_env.pop("ALEXNET_DDP_JOB", None)
        client = MlflowClient(uri)
        log_path = home / "sweep.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(args, cwd=folder, env=run_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        jobs: dict[str, str] = {}  # run id -> SLURM job
        try:
            for how in (["scontrol", "requeue"], ["scancel", "--signal=USR2"]):
                run_id, job = after_first_epoch(client, experiment, env, proc, skip=set(jobs))
                slurm(env, *how, job)
                assert len(steps(client, client.get_run(run_id))) < 4, f"{job} had finished before {how}"
                jobs[run_id] = job
                print(f"{' '.join(how)} {job} at {time.monotonic() - start:.0f} s")
            proc.wait(timeout=900)
        except (AssertionError, subprocess.TimeoutExpired) as err:
            raise AssertionError(f"{err}\n{evidence(env, folder, log_path)}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, f"the sweep failed ({proc.returncode}):\n{log_path.read_text()[-4000:]}"

        runs = training_runs(client, experiment)
        assert sorted(r.info.run_id for r in runs) == sorted(jobs), "one run per config, the same as before"
        assert len({r.data.tags["run_key"] for r in runs}) == 2
        for run in runs:
            assert run.info.status == "FINISHED", run.info.run_name
            assert run.data.tags["attempts"] == "2", run.info.run_name
            assert run.data.tags["resumed_from"] == str(
                folder / "checkpoints" / run.info.run_id / "last.ckpt"
            )
            # Resumed, not restarted: every epoch once (a restart would log its first epochs again).
            assert len(set(steps(client, run))) == len(steps(client, run)) == 4, run.info.run_name
        assert steps(client, runs[0]) == steps(client, runs[1])

        submitit = folder / "multirun" / ".submitit"
        logs = {job: (submitit / job / f"{job}_0_log.out").read_text() for job in jobs.values()}
        for job, text in logs.items():
            assert text.count("Starting with JobEnvironment") == 2, f"SLURM ran {job}'s script twice"
        by_submitit = logs[job]  # the last one signalled: SIGUSR2, submitit requeued it
        assert "this job is preempted" in by_submitit and f"Requeued job {job}" in by_submitit
        (script,) = submitit.glob("*/*_submission.sh")
        assert "#SBATCH --requeue" in script.read_text() and "#SBATCH --signal=USR2@120" in script.read_text()
    print(f"sweep with two requeued jobs: {time.monotonic() - start:.0f} s in all")
