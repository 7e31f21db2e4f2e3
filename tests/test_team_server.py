"""The team setup against the real thing: a throwaway PostgreSQL 15 cluster (initdb in a temporary folder, run
as a non-root user), a real `mlflow server` on it, Optuna studies in it, `python src/train.py` jobs through
joblib and submitit.

Default run: one end-to-end job with password-bearing URLs (PostgreSQL checks its password), whose secrets
must appear nowhere. The rest is slow (`pytest -m slow tests/test_team_server.py`) and shares one team setup
started by `scripts/team_server.py start`, the command people run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import scratch
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "src" / "train.py"
SCRIPT = ROOT / "scripts" / "team_server.py"
SMOKE = ["experiment=smoke", "data.synthetic_size=64"]

sys.path.insert(0, str(SCRIPT.parent))  # as when the script runs: its modules beside it (spawned writers too)
_spec = importlib.util.spec_from_file_location("team_server", SCRIPT)
team = importlib.util.module_from_spec(_spec)
sys.modules["team_server"] = team  # its dataclasses look their module up by name
_spec.loader.exec_module(team)
import team_load  # noqa: E402
import team_services  # noqa: E402


def _missing() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[team]')"
    try:
        team_services.pg_bindir()
        team_services.default_os_user()
    except team_services.TeamError as err:
        return str(err)
    return None


_MISSING = _missing()
if _MISSING and os.environ.get("ALEXNET_REQUIRE_POSTGRES"):  # CI with PostgreSQL: fail, not skip quietly
    raise RuntimeError(_MISSING)
needs_postgres = pytest.mark.skipif(_MISSING is not None, reason=f"no PostgreSQL: {_MISSING}")


def train_command(tmp: Path, *overrides: str, env: dict[str, str | None], multirun: bool = False):
    """`python src/train.py [-m] ...` with its outputs in ``tmp`` and the URIs in its environment, as people
    run it after `eval "$(python scripts/team_server.py start)"`."""
    tmp.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, str(TRAIN), *(["-m"] if multirun else []),
        f"hydra.run.dir={tmp / 'run'}", f"hydra.sweep.dir={tmp / 'multirun'}",
        f"paths.checkpoint_dir={tmp / 'checkpoints'}", f"paths.cache_dir={tmp / 'cache'}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **{k: v for k, v in env.items() if v is not None}}
    for key in ("ALEXNET_DDP_JOB", *(k for k, v in env.items() if v is None)):
        full_env.pop(key, None)
    return args, full_env


def train(tmp: Path, *overrides: str, env: dict[str, str | None], multirun: bool = False, timeout: int = 600):
    args, full_env = train_command(tmp, *overrides, env=env, multirun=multirun)
    return subprocess.run(args, cwd=tmp, env=full_env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def training_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    return [r for r in runs if "run_key" in r.data.tags]


def histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def everything_written(client: MlflowClient, experiment: str, into: Path) -> str:
    """Every param, tag and artifact of every run of ``experiment`` (parents and summaries too), as text."""
    exp = client.get_experiment_by_name(experiment)
    parts = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        parts += [f"{k}={v}" for k, v in run.data.params.items()]
        parts += [f"{k}={v}" for k, v in run.data.tags.items()]
        parts.append(str(run.info.artifact_uri))
        folder = into / run.info.run_id
        folder.mkdir(parents=True)
        client.download_artifacts(run.info.run_id, "", str(folder))
        parts += [p.read_bytes().decode(errors="replace") for p in folder.rglob("*") if p.is_file()]
    return "\n".join(parts)


def database_text(pg, database: str) -> str:
    """Every row of every table of ``database``, as text."""
    with pg.connect(database) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        return "\n".join(repr(conn.execute(f'SELECT * FROM "{name}"').fetchall()) for (name,) in tables)


def files_text(folder: Path, skip_hydra_dirs: bool = False) -> dict[Path, str]:
    return {
        p: p.read_bytes().decode(errors="replace")
        for p in folder.rglob("*")
        if p.is_file() and not (skip_hydra_dirs and ".hydra" in p.parts) and p.suffix not in (".ckpt", ".pkl")
    }


# --- Default run: one end-to-end job, no secret anywhere ----------------------------------------------------


@needs_postgres
def test_passwords_in_urls_reach_neither_tracker_nor_logs(tmp_path: Path):
    """A PostgreSQL role whose password is checked, an MLflow URL with user:password@: a 1-trial Optuna study
    of a smoke job with both URLs in the environment. The run, its metric points and the trial read back
    alike; neither password is in any param, tag, artifact, log line, output file, or the Optuna storage."""
    import optuna
    import psycopg

    db_secret, http_secret = f"db{secrets.token_hex(8)}", f"http{secrets.token_hex(8)}"
    with scratch("alexnet-secrets-") as home:
        pg = team_services.Postgres(home / "pg", team_services.free_port(), throwaway=True)
        pg.init()
        pg.start()
        server = None
        try:
            pg.ensure_role("alexnet", db_secret)
            pg.require_password("alexnet")
            for database in ("mlflow", "optuna"):
                pg.ensure_database(database, "alexnet")
            with pytest.raises(psycopg.OperationalError, match="password"):  # the password is checked
                psycopg.connect(f"postgresql://alexnet:wrong@127.0.0.1:{pg.port}/optuna", connect_timeout=10)
            server = team_services.MlflowServer(
                pg.url("mlflow", "alexnet", db_secret), home / "artifacts", team_services.free_port(),
                workers=1, log_path=home / "mlflow.log",
            )  # fmt: skip
            server.start()
            storage = pg.url("optuna", "alexnet", db_secret)
            env = {
                "MLFLOW_TRACKING_URI": f"http://alice:{http_secret}@127.0.0.1:{server.port}",
                "OPTUNA_STORAGE": storage,
            }
            proc = ok(
                train(
                    tmp_path, "hparams_search=cifar_sgd", "hydra.sweeper.n_trials=1", *SMOKE, env=env,
                    multirun=True,
                )
            )  # fmt: skip

            client = MlflowClient(server.uri)
            (run,) = training_runs(client, "smoke")
            assert run.info.status == "FINISHED"
            (trial,) = optuna.load_study(study_name="cifar_sgd", storage=storage).trials
            assert trial.state.name == "COMPLETE" and trial.user_attrs["mlflow_run_id"] == run.info.run_id
            curve = [value for _, value in histories(client, run)["val/top1_err"]]
            assert curve == [trial.intermediate_values[epoch] for epoch in sorted(trial.intermediate_values)]
            assert trial.value == run.data.metrics["best/val_top1_err"]
            # Masked, not dropped: the URLs are there, with *** for the passwords.
            assert (
                run.data.tags["optuna.storage"]
                == f"postgresql+psycopg://alexnet:***@127.0.0.1:{pg.port}/optuna"
            )

            written = everything_written(client, "smoke", tmp_path / "artifacts")
            assert f"http://alice:***@127.0.0.1:{server.port}" in written  # config.yaml: logger.tracking_uri
            outputs = files_text(tmp_path / "multirun")
            assert any(p.name == "optimization_results.yaml" for p in outputs)
            places = {
                "MLflow params, tags, artifacts": written,
                "stdout": proc.stdout,
                "stderr": proc.stderr,
                "the Optuna database": database_text(pg, "optuna"),
                "the MLflow database": database_text(pg, "mlflow"),
                **{str(p.relative_to(tmp_path)): text for p, text in outputs.items()},
            }
            for place, text in places.items():
                for secret in (db_secret, http_secret):
                    assert secret not in text, f"a password in {place}"
        finally:
            if server is not None:
                server.stop()
            pg.stop()


def test_every_log_record_is_masked_whoever_logs_it():
    """Masked when the record is made: any logger (here a fresh one, as Hydra's and MLflow's are), any
    handler (added after the fact), the traceback too."""
    import io
    import logging

    from alexnet import tracking  # noqa: F401 - installs the masking

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(f"somebody.else.{secrets.token_hex(4)}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("launching logger.tracking_uri=%s", "http://bob:hunter2@host:5000")
        try:
            raise RuntimeError("cannot open postgresql+psycopg://alexnet:s3cret@db/optuna")
        except RuntimeError:
            logger.exception("storage")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "http://bob:***@host:5000" in text and "alexnet:***@db" in text
    assert "hunter2" not in text and "s3cret" not in text


def test_reachability_check_sends_url_credentials_as_basic_auth():
    """check_reachable with http://user:password@host (urllib takes no credentials in a URL; requests, which
    MLflow's client uses, sends them as basic authentication): the same header, no password in the error."""
    import base64
    import http.server
    import threading

    from alexnet import tracking
    from alexnet.errors import TrackingError

    seen = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200 if self.headers.get("Authorization") else 401)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        tracking.check_reachable(f"http://alice:p%40ss@127.0.0.1:{port}/")
        assert seen == [("/health", "Basic " + base64.b64encode(b"alice:p@ss").decode())]
        with pytest.raises(TrackingError) as err:
            tracking.check_reachable(f"http://alice:hunter2@127.0.0.1:{team_services.free_port()}")
        assert "alice:***@" in str(err.value) and "hunter2" not in str(err.value)
    finally:
        server.shutdown()


def test_a_submitit_job_relaunches_the_script_with_its_config(monkeypatch):
    """A DDP job under submitit: sys.argv is submitit's, so the other processes get the script that was
    started and the config it was composed from, then the job's own overrides (no sweep, no launcher)."""
    from omegaconf import OmegaConf

    from alexnet import ddp

    monkeypatch.setenv(ddp.SCRIPT_ENV, "/repo/src/train.py")
    hydra_cfg = OmegaConf.create(
        {
            "job": {"config_name": "train"},
            "runtime": {
                "config_sources": [
                    {"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
                    {"path": "/repo/conf", "schema": "file", "provider": "main"},
                    {"path": "/extra", "schema": "file", "provider": "command-line"},
                ]
            },
        }
    )
    argv = ddp._single_run_argv(
        ddp._submitit_argv(hydra_cfg),
        ["hydra/launcher=submitit_local", "hydra.sweep.dir=/s", "hydra.mode=MULTIRUN"],
        ["seed=2", "devices=ddp"],
    )
    assert argv == [
        "/repo/src/train.py", "--config-path", "/repo/conf", "--config-name", "train",
        "--config-dir", "/extra", "seed=2", "devices=ddp",
    ]  # fmt: skip


def test_slurm_example_is_a_submitit_slurm_launcher():
    """conf/hydra/launcher/slurm.yaml: submitit's SLURM launcher, one task per job (DDP jobs start their own
    processes)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 1 and launcher.nodes == 1


# --- Slow: the team setup as `scripts/team_server.py start` makes it ----------------------------------------


@pytest.fixture(scope="module")
def team_setup() -> Iterator[dict[str, str]]:
    """`python scripts/team_server.py start` in a temporary --root on free ports: its two exports."""
    with scratch("alexnet-team-") as home:
        command = [sys.executable, str(SCRIPT), "--root", str(home / "team")]
        ports = ["--port-db", str(team_services.free_port()), "--port-mlflow", str(team_services.free_port())]
        started = subprocess.run([*command, "start", *ports], capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        try:
            yield exports | {"_command": json.dumps(command), "_home": str(home)}
        finally:
            subprocess.run([*command, "stop"], capture_output=True, text=True, timeout=300)


@needs_postgres
@pytest.mark.slow
def test_team_server_start_is_idempotent_and_prints_the_exports(team_setup):
    command = json.loads(team_setup["_command"])
    assert set(team_setup) >= {"MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"}
    assert team_setup["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")  # loopback by default
    assert team_setup["OPTUNA_STORAGE"].startswith("postgresql+psycopg://alexnet@")  # no password printed
    start = time.monotonic()
    again = subprocess.run([*command, "start"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and time.monotonic() - start < 30, again.stderr  # reused, not restarted
    assert dict(line.removeprefix("export ").split("=", 1) for line in again.stdout.splitlines()) == {
        k: v for k, v in team_setup.items() if not k.startswith("_")
    }
    assert "already runs" in again.stderr
    status = subprocess.run([*command, "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "healthy" in status.stderr
    team_root = Path(team_setup["_home"]) / "team"
    password = json.loads((team_root / "credentials.json").read_text())["alexnet"]
    assert password not in again.stdout + again.stderr + status.stdout + status.stderr
    assert Path(team_setup["PGPASSFILE"]).read_text().strip().endswith(f":alexnet:{password}")
    assert oct((team_root / "credentials.json").stat().st_mode & 0o777) == "0o600"
    # The server's database URL (with the password) is in its environment, not on its command line.
    pid = int((team_root / "mlflow.pid").read_text())
    assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def uris(team_setup) -> dict[str, str]:
    return {k: v for k, v in team_setup.items() if not k.startswith("_")}


@needs_postgres
@pytest.mark.slow
def test_parallel_sweep_and_two_worker_study_read_back_whole(team_setup, tmp_path: Path):
    """4 jobs at once (joblib) and a study of 2 trials run 2 at a time, on the shared server and storage:
    every run, every metric point and every trial reads back, and they agree with each other."""
    import optuna

    env = uris(team_setup)
    experiment = f"parallel-{secrets.token_hex(4)}"
    study_name = f"study-{secrets.token_hex(4)}"
    common = [*SMOKE, f"logger.experiment_name={experiment}", "trainer.max_epochs=2"]
    ok(train(tmp_path / "sweep", *common, "seed=1,2,3,4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
             env=env, multirun=True))  # fmt: skip
    ok(train(tmp_path / "study", *common, "hparams_search=cifar_sgd",
             f"hydra.sweeper.study_name={study_name}", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
             "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", env=env, multirun=True))  # fmt: skip

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = training_runs(client, experiment)
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["run_key"] for r in runs}) == 6
    curves = {r.info.run_id: histories(client, r) for r in runs}
    for run in runs:
        assert [step for step, _ in curves[run.info.run_id]["val/top1_err"]] == [0, 1], run.info.run_name
    shapes = {json.dumps({k: len(v) for k, v in c.items() if k != "optuna/value"}, sort_keys=True)
              for c in curves.values()}  # fmt: skip
    assert len(shapes) == 1, "every job logged the same points"
    sweep = [r for r in runs if "optuna.trial" not in r.data.tags]
    assert sorted(r.data.params["seed"] for r in sweep) == ["1", "2", "3", "4"]
    assert len({r.data.tags["mlflow.parentRunId"] for r in sweep}) == 1  # one parent run for the sweep

    os.environ["PGPASSFILE"] = env["PGPASSFILE"]  # the storage URL holds no password: libpq reads it there
    study = optuna.load_study(study_name=study_name, storage=env["OPTUNA_STORAGE"])
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial"] == str(trial.number)
        curve = [value for _, value in curves[run.info.run_id]["val/top1_err"]]
        assert curve == [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
        assert trial.value == run.data.metrics["best/val_top1_err"]


@needs_postgres
@pytest.mark.slow
def test_a_server_restart_mid_sweep_loses_and_duplicates_nothing(team_setup, tmp_path: Path):
    """The MLflow server is stopped and started again while 4 jobs log to it. The jobs ride it out with the
    client's retries, or fail and resume when the sweep is run again; either way every run is there once,
    with every metric point a calm run of the same config logs."""
    env = uris(team_setup)
    experiment = f"restart-{secrets.token_hex(4)}"
    common = [*SMOKE, f"logger.experiment_name={experiment}", "trainer.max_epochs=3"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    ok(train(tmp_path / "calm", *common, "seed=0", env=env))
    (calm,) = training_runs(client, experiment)
    calm_shape = {k: len(v) for k, v in histories(client, calm).items()}

    sweep = [*common, "seed=1,2,3,4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"]
    args, full_env = train_command(tmp_path / "sweep", *sweep, env=env, multirun=True)
    proc = subprocess.Popen(args, cwd=tmp_path / "sweep", env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    team_root = Path(team_setup["_home"]) / "team"
    try:
        deadline = time.monotonic() + 400
        while True:  # until a job has logged its first epoch
            assert proc.poll() is None, f"the sweep ended before the restart:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no job logged an epoch"
            logged = [r for r in training_runs(client, experiment) if "val/top1_err" in r.data.metrics]
            if len(logged) > 1:  # the calm run and one job of the sweep
                break
            time.sleep(0.5)
        # Restart the team's server as `stop` and `start` would, on the same port.
        command = json.loads(team_setup["_command"])
        pid = int((team_root / "mlflow.pid").read_text())
        down = time.monotonic()
        team_services.stop_group(pid)
        restarted = subprocess.run([*command, "start"], capture_output=True, text=True, timeout=600)
        assert restarted.returncode == 0, restarted.stderr
        print(f"MLflow server unreachable for {time.monotonic() - down:.0f} s")
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rode_it_out = proc.returncode == 0
    if not rode_it_out:  # the documented way back: run the same sweep again (resume=auto)
        print(f"sweep failed during the restart; rerunning it:\n{output[-2000:]}")
        ok(train(tmp_path / "sweep", *sweep, env=env, multirun=True))
    print("jobs rode out the restart" if rode_it_out else "jobs failed and resumed on rerun")

    runs = [r for r in training_runs(client, experiment) if r.info.run_id != calm.info.run_id]
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2", "3", "4"], "one run per job, none twice"
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        assert {k: len(v) for k, v in histories(client, run).items()} == calm_shape, run.info.run_name

    # Run again: nothing is trained or created again.
    ok(train(tmp_path / "sweep", *sweep, env=env, multirun=True))
    assert len(training_runs(client, experiment)) == 5


@needs_postgres
@pytest.mark.slow
@pytest.mark.parametrize("writers", [8, 16, 32])
def test_concurrent_writers_lose_nothing(team_setup, writers: int):
    """``writers`` processes write runs at once (params, an artifact, 100 batches of 4 metrics each, what a
    training job sends): every run, param, point and artifact reads back. `python scripts/team_server.py
    writers 8 16 32 64` measures the same on a new setup that `start` makes (docs/team.md has the numbers)."""
    result = team_load.measure_writers(uris(team_setup)["MLFLOW_TRACKING_URI"], writers, steps=100)
    print(json.dumps(result))
    assert result["errors"] == [] and result["runs_found"] == writers
    assert result["points_lost"] == 0 and result["points_duplicated"] == 0 and result["incomplete_runs"] == 0


# --- Slow: jobs through submitit ---------------------------------------------------------------------------


def kill_after_first_checkpoint(proc: subprocess.Popen, client, experiment: str, checkpoints: Path) -> None:
    deadline = time.monotonic() + 400
    while True:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        exp = client.get_experiment_by_name(experiment)
        runs = training_runs(client, experiment) if exp else []
        if any((checkpoints / r.info.run_id / "last.ckpt").is_file() for r in runs):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and submitit's job processes: one process group
    proc.wait(timeout=60)


@needs_postgres
@pytest.mark.slow
def test_submitit_local_sweep_is_killed_and_resumed(team_setup, tmp_path: Path):
    """hydra/launcher=submitit_local (each job its own process, as on SLURM): a sweep killed mid-training
    resumes on rerun in the same runs, from their last checkpoints; a third run trains nothing."""
    env = uris(team_setup)
    experiment = f"submitit-{secrets.token_hex(4)}"
    sweep = [*SMOKE, f"logger.experiment_name={experiment}", "trainer.max_epochs=3", "seed=1,2",
             "hydra/launcher=submitit_local"]  # fmt: skip
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    folder = tmp_path / "sweep"
    args, full_env = train_command(folder, *sweep, env=env, multirun=True)
    proc = subprocess.Popen(args, cwd=folder, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    kill_after_first_checkpoint(proc, client, experiment, folder / "checkpoints")
    before = {r.info.run_id for r in training_runs(client, experiment)}

    ok(train(folder, *sweep, env=env, multirun=True))
    runs = training_runs(client, experiment)
    assert before <= {r.info.run_id for r in runs} and len(runs) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert any(
        r.data.tags["attempts"] == "2" and r.data.tags["resumed_from"].endswith("last.ckpt") for r in runs
    )
    for run in runs:
        assert [s for s, _ in histories(client, run)["val/top1_err"]] == [0, 1, 2], "one curve, every epoch"
    assert list((folder / "multirun" / ".submitit").rglob("*_log.out")), "the jobs ran through submitit"
    ok(train(folder, *sweep, env=env, multirun=True))
    assert {r.info.run_id for r in training_runs(client, experiment)} == {r.info.run_id for r in runs}


@needs_postgres
@pytest.mark.slow
def test_ddp_job_under_submitit_local(team_setup, tmp_path: Path):
    """devices=ddp under submitit: the job (submitit's process, not src/train.py) relaunches src/train.py for
    its second process; one FINISHED run."""
    env = uris(team_setup)
    experiment = f"ddp-{secrets.token_hex(4)}"
    ok(train(tmp_path, *SMOKE, f"logger.experiment_name={experiment}", "devices=ddp", "devices.count=2",
             "trainer.accelerator=cpu", "hydra/launcher=submitit_local", env=env, multirun=True))  # fmt: skip
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = training_runs(client, experiment)
    assert run.info.status == "FINISHED" and "test/top1_err_1crop" in run.data.metrics
    logs = {p.name for p in (tmp_path / "multirun" / "0").glob("*.log")}
    assert "train_ddp_process_1.log" in logs, logs  # the second process ran src/train.py in the job's folder


@needs_postgres
@pytest.mark.slow
def test_passwords_on_the_command_line_reach_neither_tracker_nor_logs(team_setup, tmp_path: Path):
    """The same URLs passed as overrides instead (logger.tracking_uri=..., hydra.sweeper.storage=...): refused
    in one line before anything is written (Hydra would keep them as typed in .hydra/ and multirun.yaml)."""
    env = uris(team_setup)
    db_secret = json.loads((Path(team_setup["_home"]) / "team" / "credentials.json").read_text())["alexnet"]
    storage = env.pop("OPTUNA_STORAGE").replace("alexnet@", f"alexnet:{db_secret}@")
    http_secret = f"http{secrets.token_hex(8)}"
    tracking = env.pop("MLFLOW_TRACKING_URI").replace("http://", f"http://bob:{http_secret}@")
    experiment = f"cli-secrets-{secrets.token_hex(4)}"
    proc = train(
        tmp_path, *SMOKE, f"logger.experiment_name={experiment}", f"logger.tracking_uri={tracking}",
        "hparams_search=cifar_sgd", f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=1",
        f"hydra.sweeper.study_name={experiment}",
        env={"MLFLOW_TRACKING_URI": None, "OPTUNA_STORAGE": None}, multirun=True,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("Config error: hydra.sweeper.storage on the")
    assert MlflowClient(tracking).get_experiment_by_name(experiment) is None
    outputs = files_text(tmp_path)
    places = {"stdout": proc.stdout, "stderr": proc.stderr, **{str(p): text for p, text in outputs.items()}}
    for place, text in places.items():
        for secret in (db_secret, http_secret):
            assert secret not in text, f"a password in {place}"
