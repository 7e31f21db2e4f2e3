"""Developer sessions: `nox -s tests lint` (what CI runs), `slow`, `benchmarks`, `quickstart`, `ablations`,
`server`.

The sessions run in the environment nox is started from (python=False): the project's torch wheels are
gigabytes, so install once as the README says (`pip install -e ".[dev]"`) and let every session reuse it.
"""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The default test run (what CI runs): everything but the tests marked slow."""
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=False)
def slow(session: nox.Session) -> None:
    """Longer tests: a full CIFAR-10 epoch, the full-size 227 network, DDP sweeps, the team server's load.
    One at a time (-n 0): the load test and the DDP sweeps measure and time out as if alone on the machine."""
    session.run("python", "-m", "pytest", "-m", "slow", "-n", "0", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=False)
def benchmarks(session: nox.Session) -> None:
    """Ratios measured within one run (never absolute seconds): see benchmarks/*.md."""
    for script in ("training_speed.py", "profile_step.py", "lrn_speed.py", "loader_speed.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)


@nox.session(python=False)
def quickstart(session: nox.Session) -> None:
    """The README's main job: one claim (LRN, 2 arms x 3 seeds) at the first-hour scale, then its report."""
    session.run("python", "src/train.py", "-m", "+ablation=lrn", "experiment=quick", success_codes=[0, 1])
    session.run("python", "src/report.py", "ablation_quick")


@nox.session(python=False)
def ablations(session: nox.Session) -> None:
    """The paper's claims at the CPU scale on CIFAR-10, then the report (docs/results.md has what it gave).

    `nox -s ablations` runs every claim: the 2012 net's arms (+ablation=paper), the factorial design, and
    Figure 1's first stage (its report names the second); `nox -s ablations -- lrn pooling` runs the named
    sweeps of conf/ablation/ only. A failed job does not stop the others, and the report lists it, so the
    report is written whatever the sweeps' exit codes.
    """
    from alexnet.report.claims import own_preset  # the project's env (python=False); not at `nox -l`

    for sweep in session.posargs or ["paper", "factorial", "figure1"]:
        scale = f"experiment={own_preset(sweep, 'cpu')}"  # cpu_figure1 for figure1, as the report names it
        session.run("python", "src/train.py", "-m", f"+ablation={sweep}", scale, success_codes=[0, 1])
    session.run("python", "src/report.py", "ablation_cpu")


@nox.session(python=False)
def server(session: nox.Session) -> None:
    """A local team setup (docs/team.md): PostgreSQL, an MLflow server on it and an Optuna storage; prints
    the URIs to export. `nox -s server -- stop` stops it."""
    session.run("python", "scripts/team_server.py", *(session.posargs or ["start"]))
