"""The team setup through crashes (docs/team.md, "Crashes"): its files are written atomically, so a process
killed while writing one leaves nothing that breaks a later command, and a corrupt one is named in one line;
`start` after `stop` takes other ports; and (slow) PostgreSQL and the MLflow server, both killed with SIGKILL
while a sweep logs to them, lose and duplicate nothing once `start` brings them back."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import scratch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
SCRIPT = SCRIPTS / "team_server.py"

sys.path.insert(0, str(SCRIPTS))  # as when the script runs: its modules beside it
if "team_server" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("team_server", SCRIPT)
    sys.modules["team_server"] = importlib.util.module_from_spec(_spec)  # its dataclasses look it up by name
    _spec.loader.exec_module(sys.modules["team_server"])
team = sys.modules["team_server"]
import team_files  # noqa: E402
import team_services  # noqa: E402
from test_team_server import needs_postgres  # noqa: E402  (CI: PostgreSQL required, not skipped)


def script(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def exports(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    return dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())


# --- Files written atomically ---------------------------------------------------------------------------


def test_a_crash_while_writing_the_passwords_leaves_nothing_that_breaks_the_next_command(tmp_path: Path):
    """The process is killed (SIGKILL) after the passwords are written and before the file is in place:
    no credentials.json (the old code left an empty one, and every later command failed on it), the
    half-done temporary file is closed to others, and the next command makes the file whole."""
    root = tmp_path / "team"
    crash = (
        "import os, signal, sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # between the write and the rename\n"
        "import team_server\n"
        f"team_server.Team(Path({str(root)!r})).credentials()\n"
    )
    proc = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (root / "credentials.json").exists()
    (leftover,) = root.glob(".credentials.json.*.tmp")
    assert oct(leftover.stat().st_mode & 0o777) == "0o600"

    values = team.Team(root).credentials()
    assert set(values) == {"admin", "alexnet"} and all(len(v) >= 24 for v in values.values())
    assert oct((root / "credentials.json").stat().st_mode & 0o777) == "0o600"
    assert team.Team(root).credentials() == values  # kept, not made again


def test_two_starts_at_once_keep_one_set_of_passwords(tmp_path: Path):
    """The passwords file is created only if absent (a link, not a rename over it): the second writer keeps
    the first one's passwords instead of replacing them under a cluster that already took them."""
    path = tmp_path / "credentials.json"
    assert team_files.write_atomic(path, '{"admin": "a", "alexnet": "b"}', mode=0o600, exclusive=True)
    assert not team_files.write_atomic(path, '{"admin": "c", "alexnet": "d"}', mode=0o600, exclusive=True)
    assert json.loads(path.read_text()) == {"admin": "a", "alexnet": "b"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("name", ["settings.json", "credentials.json"])
@pytest.mark.parametrize("text", ["", '{"admin": "abc', "[1, 2]", '{"port": 1}'])
def test_a_corrupt_file_is_named_in_one_line(tmp_path: Path, capsys, name: str, text: str):
    """An empty, truncated or foreign settings.json or credentials.json (an older version killed mid-write,
    an edit by hand): every command says in one line which file and what to do, no traceback."""
    root = tmp_path / "team"
    root.mkdir()
    (root / "settings.json").write_text('{"host": "127.0.0.1", "port_db": 5433, "port_mlflow": 5001}')
    (root / name).write_text(text)
    for command in ("status", "stop", "start"):
        assert team.main(["--root", str(root), command]) == 1  # an exception would end the test here
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert f"{root / name}" in err and "delete it" in err, err
    assert (root / name).read_text() == text  # left for the person to look at


# --- Other ports after stop -----------------------------------------------------------------------------


@needs_postgres
def test_a_stopped_cluster_starts_on_the_port_it_is_given_now():
    """`configure` rewrites the script's settings in postgresql.conf: a cluster created on one port starts on
    another (before, it started on the old one and every connection failed)."""
    with scratch("alexnet-port-") as home:
        first = team_services.Postgres(home / "pg", team_services.free_port(), throwaway=True)
        first.init()
        first.start()
        first.stop()
        second = team_services.Postgres(home / "pg", team_services.free_port(), throwaway=True)
        try:
            second.configure()
            second.start()
            with second.connect() as conn:
                assert conn.execute("SHOW port").fetchone()[0] == str(second.port)
            assert not team_services.port_in_use(first.port)
        finally:
            second.stop()
        conf = (home / "pg" / "data" / "postgresql.conf").read_text()
        assert conf.count(team_services.CONF_MARK) == 1 and f"port = {first.port}\n" not in conf


@needs_postgres
@pytest.mark.slow
def test_start_after_stop_with_another_db_port_uses_it():
    """The command people run: start, stop, start --port-db N: PostgreSQL on N, the exports and the pgpass
    file say N, status is healthy; while it runs, another port is refused in one line."""
    with scratch("alexnet-ports-") as home:
        root = home / "team"
        mlflow_port = str(team_services.free_port())
        old, new = team_services.free_port(), team_services.free_port()
        try:
            exports(script(root, "start", "--port-db", str(old), "--port-mlflow", mlflow_port))
            busy = script(root, "start", "--port-db", str(new), timeout=120)
            assert busy.returncode == 1 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
            assert "stop it first" in busy.stderr
            assert script(root, "stop").returncode == 0
            env = exports(script(root, "start", "--port-db", str(new)))
            assert f"@127.0.0.1:{new}/optuna" in env["OPTUNA_STORAGE"]
            assert Path(env["PGPASSFILE"]).read_text().startswith(f"*:{new}:*:alexnet:")
            assert json.loads((root / "settings.json").read_text())["port_db"] == new
            status = script(root, "status", timeout=120)
            assert status.returncode == 0 and "healthy" in status.stderr, status.stderr
            assert team_services.port_in_use(new) and not team_services.port_in_use(old)
        finally:
            script(root, "stop")


# --- Slow: PostgreSQL and the MLflow server killed mid-sweep ---------------------------------------------

EPOCHS = 3
SEEDS = ("1", "2", "3")


def _kill_both(root: Path) -> None:
    """SIGKILL to PostgreSQL's postmaster and to the MLflow server's process group (uvicorn and its
    workers), as a crash of each would: nothing gets to finish or clean up."""
    postmaster = int((root / "pg" / "data" / "postmaster.pid").read_text().splitlines()[0])
    server = int((root / "mlflow.pid").read_text())
    os.kill(postmaster, signal.SIGKILL)
    os.killpg(server, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{postmaster}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


@needs_postgres
@pytest.mark.slow
def test_postgres_and_the_server_killed_mid_sweep_lose_and_duplicate_nothing(tmp_path: Path):
    """A sweep of 3 configs logs to the team setup (durable: fsync on); once its first job has logged an
    epoch, PostgreSQL and the MLflow server are killed with SIGKILL and `start` brings them back. The jobs
    ride it out on the client's retries, or fail and resume when the same sweep is run again; a last rerun
    trains nothing. Every config has exactly one run, FINISHED, with every epoch's point of every metric
    once: the points of a calm run of the same shape, no more, no fewer."""
    from mlflow import MlflowClient
    from test_team_server import histories, ok, train, train_command, training_runs

    def steps_of(client, run) -> dict[str, list[int]]:
        return {key: [step for step, _ in points] for key, points in histories(client, run).items()}

    with scratch("alexnet-crash-") as home:
        root = home / "team"
        ports = ["--port-db", str(team_services.free_port()), "--port-mlflow", str(team_services.free_port())]
        try:
            env = exports(script(root, "start", *ports))
            with team.Team(root).postgres(team.Team(root).settings()).connect() as conn:
                assert [conn.execute(f"SHOW {k}").fetchone()[0] for k in team.DURABILITY] == ["on"] * 3
            client = MlflowClient(env["MLFLOW_TRACKING_URI"])
            experiment = f"crash-{secrets.token_hex(4)}"
            common = ["experiment=smoke", "data.synthetic_size=64", f"logger.experiment_name={experiment}",
                      f"trainer.max_epochs={EPOCHS}"]  # fmt: skip
            # What a run logs when nothing happens: the reference (a job logs some summary points twice at
            # its last step, e.g. test/loss from the test and again with the summary; that is not a crash's).
            ok(train(tmp_path / "calm", *common, "seed=0", env=env))
            (calm,) = training_runs(client, experiment)
            calm_steps = steps_of(client, calm)
            assert calm_steps["val/top1_err"] == list(range(EPOCHS))
            sweep = [*common, f"seed={','.join(SEEDS)}"]
            folder = tmp_path / "sweep"
            args, full_env = train_command(folder, *sweep, env=env, multirun=True)
            proc = subprocess.Popen(args, cwd=folder, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
            try:
                deadline = time.monotonic() + 600
                while True:  # until the first job has logged an epoch
                    assert proc.poll() is None, f"the sweep ended first:\n{proc.stdout.read()[-3000:]}"
                    assert time.monotonic() < deadline, "no job logged an epoch"
                    runs = [r for r in training_runs(client, experiment) if r.info.run_id != calm.info.run_id]
                    if any("val/top1_err" in r.data.metrics for r in runs):
                        break
                    time.sleep(0.5)
                down = time.monotonic()
                _kill_both(root)
                exports(script(root, "start"))
                print(f"PostgreSQL and the MLflow server down for {time.monotonic() - down:.0f} s")
                output, _ = proc.communicate(timeout=1200)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            if proc.returncode != 0:  # the documented way back: the same sweep again (resume=auto)
                print(f"the sweep failed through the crash; rerunning it:\n{output[-2000:]}")
                ok(train(folder, *sweep, env=env, multirun=True, timeout=1200))
            else:
                print("the jobs rode out the crash")
            before = {r.info.run_id for r in training_runs(client, experiment)}
            ok(train(folder, *sweep, env=env, multirun=True, timeout=1200))  # finished: skipped

            everything = training_runs(client, experiment)
            assert {r.info.run_id for r in everything} == before, "a rerun made a run"
            runs = [r for r in everything if r.info.run_id != calm.info.run_id]
            assert sorted(r.data.params["seed"] for r in runs) == sorted(SEEDS), "one run per config"
            assert len({r.data.tags["run_key"] for r in runs}) == len(SEEDS)
            for run in runs:
                assert run.info.status == "FINISHED", run.info.run_name
                # Every metric, each step as often as in the calm run: one point per epoch, none twice.
                assert steps_of(client, run) == calm_steps, run.info.run_name
        finally:
            script(root, "stop")
