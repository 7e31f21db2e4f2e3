"""No password in any output: the masking of any text, the passwords the process knows, every way out of a
job (an unexpected error, MLflow's request errors, which quote the URL, a submitit job's files), Hydra's own
record of the command line, and the team setup's exports."""

from __future__ import annotations

import http.server
import importlib.util
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from alexnet import lease, redaction, task
from alexnet.redaction import mask_secrets

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "postgresql+psycopg://alexnet:s3cret@db:5432/optuna",
            "postgresql+psycopg://alexnet:***@db:5432/optuna",
        ),
        ("http://user:p@ss@host/x", "http://user:***@host/x"),  # the whole password, not ***@ss@host
        ("http://user:pa/ss@host:5000/api", "http://user:***@host:5000/api"),
        ("http://user:p@ss/word@host/x", "http://user:***@host/x"),
        ("postgresql://u:my secret@db/x failed", "postgresql://u:***@db/x failed"),
        ("http://u:1234@h", "http://u:***@h"),
        ("http://h/x?password=abc&y=1", "http://h/x?password=***&y=1"),
        ("sqlite:///m.db?user=a&pwd=xyz", "sqlite:///m.db?user=a&pwd=***"),
        ("host=db password=abc dbname=x", "host=db password=*** dbname=x"),
        ("Authorization: Basic dXNlcjpwdw==", "Authorization: Basic ***"),
        (
            "['logger.tracking_uri=http://u:p w@h:1', 'seed=1']",
            "['logger.tracking_uri=http://u:***@h:1', 'seed=1']",
        ),
        ("a http://a:x@h1/ and http://b:y@h2/", "a http://a:***@h1/ and http://b:***@h2/"),
        # Not passwords: ports, e-mail addresses, query keys that merely end in "token".
        ("http://host:5000/path, mail bob@example.org", "http://host:5000/path, mail bob@example.org"),
        ("http://host:5000, a@b", "http://host:5000, a@b"),
        ("sqlite:///a/b.db?timeout=60 x@y", "sqlite:///a/b.db?timeout=60 x@y"),
        ("next_page_token=abc", "next_page_token=abc"),
    ],
)
def test_passwords_in_text_are_masked(text: str, masked: str):
    assert mask_secrets(text) == masked


def test_a_known_password_is_masked_without_its_url():
    """Passwords the process knows (MLflow's MLFLOW_TRACKING_PASSWORD, those in the URLs it is given, parsed)
    are masked wherever they appear: an error that quotes one decoded, or in an Authorization header."""
    mlflow_password, url_password = f"pw{secrets.token_hex(6)}", f"p@ss/{secrets.token_hex(4)}"
    encoded = url_password.replace("@", "%40").replace("/", "%2F")
    redaction.remember_environment(
        {
            "MLFLOW_TRACKING_PASSWORD": mlflow_password,
            "OPTUNA_STORAGE": f"postgresql+psycopg://u:{encoded}@db/x",
        }
    )
    assert mask_secrets(f"401 for alice/{mlflow_password}") == "401 for alice/***"
    assert url_password not in mask_secrets(f"login with {url_password} failed")
    redaction.remember_url(f"http://bob:raw/{url_password} x@h:1")  # "/", "@", " ": urllib cannot split it
    assert mask_secrets(f"key raw/{url_password} x") == "key ***"
    assert mask_secrets(f"http://bob:raw/{url_password} x@h:1") == "http://bob:***@h:1"


def test_every_way_out_of_a_job_is_masked(capsys, caplog):
    """task.entry: an unexpected error's traceback goes to stderr masked (exit 1 in a single run; in a sweep
    the job fails with the masked message, nothing unmasked chained); a held run is a one-line skip."""
    password = f"pw{secrets.token_hex(6)}"

    def crash(cfg):
        raise RuntimeError(f"API request to http://alice:{password}@127.0.0.1:9/api failed")

    def held(cfg):
        raise lease.Held("run abc of this configuration is held by machine-a pid 1 since ...")

    def job(mode: RunMode):  # what a task gets from Hydra, with Hydra's own config set aside
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["experiment=smoke"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
            HydraConfig.instance().set_config(cfg)
            del cfg["hydra"]
        return cfg

    saved = HydraConfig.instance().cfg
    try:
        for mode in (RunMode.RUN, RunMode.MULTIRUN):
            if mode == RunMode.RUN:
                with pytest.raises(SystemExit) as exit_:
                    task.entry(crash, job(mode))
                assert exit_.value.code == 1
            else:
                with pytest.raises(redaction.MaskedError) as error:
                    task.entry(crash, job(mode))
                assert (
                    str(error.value) == "RuntimeError: API request to http://alice:***@127.0.0.1:9/api failed"
                )
                assert error.value.__context__ is None and error.value.__cause__ is None
            err = capsys.readouterr().err
            assert "Traceback" in err and "http://alice:***@127.0.0.1:9" in err and password not in err
        with caplog.at_level(logging.WARNING):
            assert task.entry(held, job(RunMode.MULTIRUN)) is None
        assert "Skipped: run abc of this configuration is held by machine-a" in caplog.text
    finally:
        HydraConfig.instance().cfg = saved


class _HealthyThenBroken(http.server.BaseHTTPRequestHandler):
    """An MLflow server that answers its health check and the experiment's lookup, then hangs up on every
    other request: MLflow's client raises an error that quotes the request URL, password included."""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/health"):
            body = b"OK"
        elif "experiments/get-by-name" in self.path:
            tags = [{"key": "mlflow.experimentKind", "value": "custom_model_development"}]
            experiment = {"experiment_id": "1", "name": "smoke", "artifact_location": "mlflow-artifacts:/1",
                          "lifecycle_stage": "active", "tags": tags}  # fmt: skip
            body = json.dumps({"experiment": experiment}).encode()
        else:
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_mlflow_request_errors_and_command_line_passwords_reach_no_output(tmp_path: Path):
    """Against a server whose URL carries a password: a sweep job under submitit_local meets MLflow's request
    error (unexpected: its traceback), and a password given on the command line is refused before Hydra
    writes anything. The password is in no output: stdout, stderr, log files, .hydra/, submitit's pickles
    and logs, any file of either job."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthyThenBroken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    password = f"pw{secrets.token_hex(8)}"
    uri = f"http://alice:{password}@127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_TRACKING_URI": uri}  # fmt: skip
    train = [sys.executable, str(ROOT / "src" / "train.py"), "experiment=smoke", "data.synthetic_size=64",
             f"paths.checkpoint_dir={tmp_path / 'ckpt'}", f"paths.cache_dir={tmp_path / 'c'}"]  # fmt: skip
    sweep = [
        *train[:2],
        "-m",
        *train[2:],
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    typed = [*train, f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'run'}"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": tmp_path}
    try:
        typed_env = {**env, "MLFLOW_TRACKING_URI": ""}
        jobs = {"sweep": subprocess.Popen(sweep, env=env, **pipes),
                "typed": subprocess.Popen(typed, env=typed_env, **pipes)}  # fmt: skip
        out = {name: proc.communicate(timeout=300) for name, proc in jobs.items()}
    finally:
        server.shutdown()

    assert jobs["sweep"].returncode != 0
    assert f"API request to http://alice:***@127.0.0.1:{server.server_address[1]}" in out["sweep"][1]
    assert jobs["typed"].returncode == 1
    assert out["typed"][1].strip().startswith("Config error: logger.tracking_uri on the command line holds")
    assert not (tmp_path / "run").exists()  # refused before Hydra wrote .hydra/
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(".hydra" in p.parts for p in files) and any(p.suffix == ".pkl" for p in files)
    job_err = "".join(p.read_text() for p in files if p.name.endswith("_log.err"))
    assert "Traceback" in job_err and "alice:***@" in job_err  # the job's own traceback, masked
    places = {f"{name} {stream}": text for name, streams in out.items()
              for stream, text in zip(("stdout", "stderr"), streams, strict=True)}  # fmt: skip
    places |= {str(p.relative_to(tmp_path)): p.read_bytes().decode(errors="replace") for p in files}
    for place, text in places.items():
        assert password not in text, f"the password in {place}"


def test_team_server_exports_hold_no_password(tmp_path: Path):
    """`team_server.py start` prints the exports: the storage URL without its password, which libpq reads
    from the pgpass file that PGPASSFILE names (mode 0600)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("team_server", ROOT / "scripts" / "team_server.py")
    team = importlib.util.module_from_spec(spec)
    sys.modules["team_server"] = team
    spec.loader.exec_module(team)
    setup = team.Team(tmp_path / "team")
    settings = team.Settings(port_db=5433, port_mlflow=5001)
    try:
        lines = setup.exports(settings)
    except team.TeamError as err:  # no PostgreSQL here: its binaries are looked up
        pytest.skip(str(err))
    password = setup.credentials()["alexnet"]
    assert lines[:2] == [
        "export MLFLOW_TRACKING_URI=http://127.0.0.1:5001",
        "export OPTUNA_STORAGE=postgresql+psycopg://alexnet@127.0.0.1:5433/optuna",
    ]
    assert not any(password in line for line in lines)
    passfile = Path(lines[2].removeprefix("export PGPASSFILE="))
    assert passfile.read_text() == f"*:5433:*:alexnet:{password}\n"
    assert oct(passfile.stat().st_mode & 0o777) == "0o600"
