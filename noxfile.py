"""Developer sessions: `nox -s tests`, `nox -s slow`, `nox -s lint`, `nox -s benchmarks`.

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
