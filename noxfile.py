"""Developer sessions: `nox -s tests`, `nox -s slow`, `nox -s lint`, `nox -s benchmarks`, `nox -s ablations`.

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
    """Longer tests: a full CIFAR-10 epoch, a training step of the full-size 227 network."""
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=False)
def benchmarks(session: nox.Session) -> None:
    """Ratios measured within one run (never absolute seconds): see benchmarks/."""
    session.run("python", "benchmarks/lrn_speed.py")
    session.run("python", "benchmarks/loader_speed.py")


# Figure 1 at the CPU scale: 2,000 training images in batches of 32 (63 steps an epoch, so that a net can
# reach 25% training error within 30 epochs on 2 cores) and a two-value learning-rate grid. The README gives
# the numbers this produced.
CPU_FIGURE1 = [
    "data.train_size=2000",
    "data.batch_size=32",
    "trainer.max_epochs=30",
    "optimizer.lr=0.003,0.01",
]


@nox.session(python=False)
def ablations(session: nox.Session) -> None:
    """The paper's claims at the CPU scale on CIFAR-10 (3 seeds each), then the report.

    `nox -s ablations` runs every claim (+ablation=paper, then Figure 1's protocol); `nox -s ablations -- lrn
    pooling` runs the named sweeps of conf/ablation/ only. A failed job does not stop the others, and the
    report lists it, so the report is written whatever the sweeps' exit codes.
    """
    for sweep in session.posargs or ["paper", "figure1"]:
        session.run(
            "python", "src/train.py", "-m", f"+ablation={sweep}", "experiment=cpu", success_codes=[0, 1]
        )
    session.run("python", "src/report.py", "ablation_cpu")
