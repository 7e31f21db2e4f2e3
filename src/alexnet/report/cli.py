"""``python src/report.py``: read an experiment's runs, analyse them, write the report and log it."""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from mlflow import MlflowClient

from alexnet.errors import ReportError
from alexnet.redaction import mask_secrets
from alexnet.report import document, render
from alexnet.report.analysis import analyse
from alexnet.report.claims import CLAIMS_FILE, ROOT, load_claims
from alexnet.report.plots import plot
from alexnet.report.rows import Row, Settings
from alexnet.report.runs import REPORT_TAG, RunRecord, fetch_runs, load_outcomes
from alexnet.tracking import git_commit

__all__ = ["ROOT", "make_report", "main", "Settings"]


def machine() -> str:
    """This machine in words: its CPU, cores and GPU (the report's timings depend on it)."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in info.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    system = f"{platform.system()} {platform.release()}, torch {torch.__version__}"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; {system}"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")


def make_report(
    experiment: str,
    tracking_uri: str,
    out: Path,
    claims_file: Path = CLAIMS_FILE,
    filter_string: str = "",
    log_to_mlflow: bool = True,
    settings: Settings | None = None,
    page: Path | None = None,
    ended_before: datetime | None = None,
) -> tuple[list[Row], list[RunRecord]]:
    settings = settings or Settings()
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ReportError(
            f"No experiment {experiment!r} in the tracking store {mask_secrets(tracking_uri)} (it has: "
            f"{names}). Run a sweep first, e.g. python src/train.py -m +ablation=lrn experiment=cpu (into "
            "'ablation_cpu')."
        )
    # A run still going has no end time, so the filter leaves it out: the runs as they stood at that time.
    ended = f"attributes.end_time < {round(ended_before.timestamp() * 1000)}" if ended_before else ""
    runs = fetch_runs(client, exp.experiment_id, " and ".join(f for f in (filter_string, ended) if f))
    if not runs:
        raise ReportError(
            f"Experiment {experiment!r} has no training runs: run an ablation sweep "
            f"(python src/train.py -m +ablation=<claim>) into it first."
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per run is noise here
    load_outcomes(client, runs)
    claims = load_claims(claims_file)
    rows, curves = analyse(claims, runs, settings, client)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(out, document.sections(rows), curves)
    title = f"AlexNet (2012) claims: measured vs reported - experiment {experiment}"
    options = {"--filter": f'"{filter_string}"' if filter_string else None,
               "--ended-before": f"{ended_before:%Y-%m-%dT%H:%M:%S}" if ended_before else None,
               "--min-seeds": settings.min_seeds if settings.min_seeds != Settings.min_seeds else None,
               "--margin": settings.margin if settings.margin != Settings.margin else None}  # fmt: skip
    rerun = " ".join([f"python src/report.py {experiment}"] + [f"{k} {v}" for k, v in options.items() if v])
    made_by = {
        "report": f"`{rerun}` at commit `{git_commit(ROOT)[:12]}`, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, from {mask_secrets(tracking_uri)}",
        "machine": machine(),
    }
    doc = document.build(title, claims, rows, runs, plots, settings, made_by)
    (out / "report.md").write_text(render.markdown(doc))
    (out / "report.html").write_text(render.to_html(doc))
    if page is not None:  # the same Markdown, without the plots (they stay with the report's files)
        for section in doc.sections:
            section.blocks = [b for b in section.blocks if not isinstance(b, render.Image)]
        page.write_text(render.markdown(doc))
    (out / "claims.yaml").write_text(Path(claims_file).read_text())
    if log_to_mlflow:
        _log_report_run(client, exp.experiment_id, out, rows, runs)
    return rows, runs


def _log_report_run(
    client: MlflowClient, experiment_id: str, out: Path, rows: list[Row], runs: list[RunRecord]
) -> None:
    """The report as a run of its own: every file as an artifact, each row's verdicts as tags and its numbers
    (mean, interval, minimum detectable effect, seeds needed) as metrics."""
    run = client.create_run(experiment_id, run_name="report", tags={REPORT_TAG: "true"})
    try:
        client.log_artifacts(run.info.run_id, str(out))
        for row in rows:
            client.set_tag(run.info.run_id, f"verdict.{row.key}", row.verdict)
            client.set_tag(run.info.run_id, f"verdict_holm.{row.key}", row.adjusted_verdict)
            numbers = {"mean": row.estimate.mean, "low": row.estimate.low, "high": row.estimate.high,
                       "mde": row.mde, "seeds_needed": float(row.seeds_needed or math.nan)}  # fmt: skip
            for name, value in numbers.items():
                if math.isfinite(value):
                    client.log_metric(run.info.run_id, f"{name}.{row.key}", value)
        client.log_param(run.info.run_id, "runs_read", len(runs))
        client.log_param(run.info.run_id, "runs_not_finished", sum(not r.finished for r in runs))
        client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python src/report.py",
        description="Read an experiment's ablation runs back from MLflow and write the measured-vs-reported "
        "report (Markdown, HTML, PNG plots), also logged as the artifacts of a 'report' run.",
    )
    parser.add_argument("experiment", help="the MLflow experiment name, e.g. ablation_cpu (experiment=cpu)")
    parser.add_argument("--tracking-uri", default=default_tracking_uri(), help="default: %(default)s")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>)")
    parser.add_argument("--claims", type=Path, default=CLAIMS_FILE, help="default: %(default)s")
    parser.add_argument(
        "--filter", default="", help="an MLflow search filter, e.g. \"tags.sweep_dir = '...'\""
    )
    parser.add_argument("--min-seeds", type=int, default=Settings.min_seeds, help="default: %(default)s")
    parser.add_argument("--margin", type=float, default=Settings.margin, help="points; default: %(default)s")
    parser.add_argument("--no-log", action="store_true", help="do not log a report run to MLflow")
    parser.add_argument("--page", type=Path, help="also write the Markdown, without plots, to this file")
    parser.add_argument(
        "--ended-before", type=_utc_time, metavar="UTC", help="read only the runs that had ended (finished, "
        "failed or killed) by this UTC time, e.g. 2026-11-30T00:09: the page as it stood then, made again "
        "from a store that has grown since"
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or ROOT / "reports" / args.experiment
    settings = Settings(min_seeds=args.min_seeds, margin=args.margin)
    try:
        rows, runs = make_report(
            args.experiment,
            args.tracking_uri,
            out,
            args.claims,
            args.filter,
            not args.no_log,
            settings,
            args.page,
            args.ended_before,
        )
    except ReportError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"\n{len(runs)} runs read. The report: {out / 'report.md'} (and report.html, with the plots)")
    return 0


def _utc_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: write it as 2026-11-30T00:09") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
