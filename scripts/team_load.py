"""How many concurrent writers an MLflow server takes (`python scripts/team_server.py writers 8 16`,
docs/team.md): each writer sends one training job's traffic, and every point is read back."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from team_services import NO_TELEMETRY, TeamError, log

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
    for key, value in NO_TELEMETRY.items():  # as in the jobs, which get it from `start`'s exports
        os.environ.setdefault(key, value)
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


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, to copy as printed (docs/team.md)."""
    rows = [
        "| writers | requests | seconds | requests/s | slowest request | runs read back | points read back "
        "| lost | duplicated | incomplete runs | failed writers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['writers']} | {r['requests']} | {r['seconds']} | {r['requests_per_s']} | "
            f"{r['max_latency_s']} s | {r['runs_found']} | {r['points_found']} of {r['points_expected']} | "
            f"{r['points_lost']} | {r['points_duplicated']} | {r['incomplete_runs']} | {len(r['errors'])} |"
        )
    return "\n".join(rows)


def cmd_writers(args: argparse.Namespace, setup: Callable[[Path, int], AbstractContextManager[str]]) -> int:
    """``setup(home, workers)``: a team setup as `start` makes it, in ``home``; what it yields (the server's
    URI) is measured, then it is stopped and ``home`` deleted."""
    home = Path(tempfile.mkdtemp(prefix="alexnet-writers-"))
    os.chmod(home, 0o711)  # PostgreSQL's user passes through to its folder
    results = []
    try:
        with contextlib.ExitStack() as stack:
            uri = args.uri or stack.enter_context(setup(home, args.workers))
            for n in args.counts:
                log(f"{n} concurrent writers, {args.steps} steps each ...")
                results.append(measure_writers(uri, n, args.steps))
                print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(table(results), flush=True)
    return 0
