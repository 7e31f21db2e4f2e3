"""``python src/report.py``: read an experiment's runs, analyse them, write the report and log it."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.search_utils import SearchUtils

from alexnet import sweeps
from alexnet.errors import ReportError, UserError
from alexnet.redaction import mask_secrets
from alexnet.report import bundle, document, render
from alexnet.report.analysis import analyse
from alexnet.report.bundle import machine
from alexnet.report.claims import CLAIMS_FILE, ROOT, Claim, load_claims
from alexnet.report.plots import plot
from alexnet.report.rows import Row, Settings
from alexnet.report.runs import (
    REPORT_TAG,
    RunRecord,
    check_outcomes,
    fetch_runs,
    find_experiment,
    first_line,
    load_outcomes,
    oldest_first,
    search_filter,
)
from alexnet.tracking import check_reachable, git_commit

__all__ = ["ROOT", "make_report", "main", "machine", "Settings"]


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")


def shown(path: Path) -> str:
    """A path as the page shows it: from the checkout's root when inside it, so that it reads the same
    whichever folder the command ran in."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


def make_report(
    experiment: str,
    tracking_uri: str | None,
    out: Path,
    claims_file: Path = CLAIMS_FILE,
    filter_string: str = "",
    log_to_mlflow: bool = True,
    settings: Settings | None = None,
    page: Path | None = None,
    ended_before: datetime | None = None,
    bundles: Sequence[Path] = (),
    allow_seeds_only: bool = False,
    readme: Path | None = None,
) -> tuple[list[Row], list[RunRecord]]:
    """The report of ``experiment``'s runs in ``bundles`` and in the store at ``tracking_uri`` (None: the
    bundles alone), de-duplicated by run id; the page (and its ``.json`` twin) too, given ``page``, and the
    primary rows' table between the markers of ``readme``."""
    settings = settings or Settings()
    claims = read_claims(claims_file)  # every mistake of the user's is found before anything is read
    query = search_filter(filter_string, ended_before)
    check_filter(query)
    if page is not None and page.suffix == ".json":
        raise ReportError(f"--page {page}: the page is Markdown, and its .json twin goes beside it")
    readme_text = _readme_parts(readme) if readme is not None else None
    # Bundles of other experiments may join (a pilot's runs at this protocol, another machine's store): the
    # runs' configs decide what is compared, and the page names every bundle with its experiment.
    headers = {path: bundle.read_header(path) for path in bundles}
    if tracking_uri is not None:
        check_reachable(tracking_uri, seconds=5.0)
    records, store = _read_runs(experiment, tracking_uri, bundles, query)
    check_outcomes(records, allow_seeds_only)
    rows, curves = analyse(claims, records, settings)
    _note_unreadable_outcomes(rows)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(out, document.sections(rows), curves)
    title = f"AlexNet (2012) claims: measured vs reported - experiment {experiment}"
    options = [("--from", shown(p)) for p in bundles] + [
        ("--tracking-uri", mask_secrets(tracking_uri) if bundles and tracking_uri else None),
        ("--filter", f'"{filter_string}"' if filter_string else None),
        ("--ended-before", f"{ended_before:%Y-%m-%dT%H:%M:%S}" if ended_before else None),
        ("--min-seeds", settings.min_seeds if settings.min_seeds != Settings.min_seeds else None),
        ("--margin", settings.margin if settings.margin != Settings.margin else None),
        ("--allow-seeds-only", "" if allow_seeds_only else None),
    ]  # fmt: skip
    shown_options = [f"{k} {v}".strip() for k, v in options if v is not None]
    rerun = " ".join([f"python src/report.py {experiment}", *shown_options])
    doc = document.build(
        title, claims, rows, records, plots, settings, _made_by(rerun, headers, tracking_uri)
    )
    (out / "report.md").write_text(render.markdown(doc))
    (out / "report.html").write_text(render.to_html(doc))
    if page is not None:  # the same Markdown, without the plots (they stay with the report's files)
        for section in doc.sections:
            section.blocks = [b for b in section.blocks if not isinstance(b, render.Image)]
        page.write_text(render.markdown(doc))
        page.with_suffix(".json").write_text(bundle.page_json(rows))
    if readme is not None:
        before, after = readme_text
        table = "\n".join(render.table_lines(document.primary_table(rows)))
        readme.write_text(f"{before}{README_START}\n{table}\n{after}")
    (out / "claims.yaml").write_text(Path(claims_file).read_text())
    if log_to_mlflow and store is not None:  # bundles alone: no store to log the report into
        _log_report_run(*store, out, rows, records)
    return rows, records


README_START, README_END = "<!-- primary rows: report.py --readme -->", "<!-- end of primary rows -->"


def _readme_parts(readme: Path) -> tuple[str, str]:
    """The text before the README's table and from its end marker on (the table goes between)."""
    try:
        text = readme.read_text()
    except OSError as err:
        raise ReportError(f"--readme {readme}: cannot read it ({err.strerror})") from None
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ReportError(
            f"--readme {readme}: no table markers; put the lines {README_START} and {README_END} where "
            "the table of primary rows goes"
        )
    return text[:start], text[end:]


def _read_runs(
    experiment: str, tracking_uri: str | None, bundles: Sequence[Path], query: str
) -> tuple[list[RunRecord], tuple[MlflowClient, str] | None]:
    """The runs of the bundles, then of the store (a run in both: the store's, the newer), oldest first;
    and the store's client and experiment id, if one was read."""
    runs = {r.run_id: r for path in bundles for r in bundle.select(bundle.load(path), query)}
    store = None
    if tracking_uri is not None:
        client = MlflowClient(tracking_uri)
        store = client, find_experiment(client, experiment)
        fetched = fetch_runs(client, store[1], query)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per run is noise here
        load_outcomes(client, fetched)
        runs |= {r.run_id: r for r in fetched}
    if not runs:
        raise ReportError(
            f"Experiment {experiment!r} has no training runs: run an ablation sweep "
            f"(python src/train.py -m +ablation=<claim>) into it first."
        )
    return oldest_first(runs.values()), store


def _made_by(rerun: str, headers: dict[Path, dict], tracking_uri: str | None) -> dict[str, str]:
    """The page's "made by" lines. From bundles alone they hold nothing of this machine or this moment, so
    that the same bundles and code make the same page, byte for byte; from a store, when, where and how."""
    sources = [bundle.describe(shown(path), header) for path, header in headers.items()]
    if tracking_uri is None:
        exported = dict.fromkeys(header["exports"][-1]["machine"] for header in headers.values())
        return {"report": f"`{rerun}`, from " + "; ".join(sources),
                "machine": "; ".join(exported) + " (where the bundle was exported)"}  # fmt: skip
    now = datetime.now(timezone.utc)
    return {
        "report": f"`{rerun}` at commit `{git_commit(ROOT)[:12]}`, {now:%Y-%m-%d %H:%M} UTC, from "
        + "; ".join([*sources, mask_secrets(tracking_uri)]),
        "machine": machine(),
    }


def read_claims(path: Path) -> list[Claim]:
    """The claims file, or a one-line error that names it."""
    try:
        return load_claims(path)
    except ReportError:
        raise
    except FileNotFoundError:
        raise ReportError(f"--claims {path}: no such file (the default is {shown(CLAIMS_FILE)})") from None
    except Exception as err:  # noqa: BLE001 - a YAML error, a missing or unknown key: the file is wrong
        raise ReportError(
            f"--claims {path} is not a claims file ({type(err).__name__}: {first_line(err)}); compare it "
            f"with {shown(CLAIMS_FILE)}"
        ) from None


def check_filter(query: str) -> None:
    """A malformed search filter, found before any store is asked (MLflow's own parser)."""
    try:
        SearchUtils.parse_search_filter(query)
    except MlflowException as err:
        raise ReportError(f"--filter: {first_line(err)}") from None


def _note_unreadable_outcomes(rows: list[Row]) -> None:
    """A row that fell back to the seeds because --allow-seeds-only let in runs with unreadable outcomes
    says which runs, beside its note that it holds the seeds' noise only."""
    for row in rows:
        bad = [f"{r.name} ({r.run_id})" for r in row.runs if r.outcomes_error]
        if bad and row.estimate.method == "seeds only":
            row.notes.append(f"the outcomes of {', '.join(bad)} could not be read (--allow-seeds-only)")


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
                       "mde": row.mde, "seeds_needed": float(row.seeds_needed or math.nan),
                       "seeds_needed_holm": float(row.seeds_needed_holm or math.nan)}  # fmt: skip
            for name, value in numbers.items():
                if math.isfinite(value):
                    client.log_metric(run.info.run_id, f"{name}.{row.key}", value)
        client.log_param(run.info.run_id, "runs_read", len(runs))
        client.log_param(run.info.run_id, "runs_not_finished", sum(not r.finished for r in runs))
        parents = {r.tags[MLFLOW_PARENT_RUN_ID] for r in runs if MLFLOW_PARENT_RUN_ID in r.tags}
        sweeps.link_report(client, parents, run.info.run_id, experiment_id)  # one click from each sweep
        client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line (not its usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{Path(self.prog.split()[-1]).stem}: {mask_secrets(message)} (see --help)\n")


def at_least_two(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seeds of at least 2")
    return value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of points above 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python src/report.py",
        description="Read an experiment's ablation runs back from MLflow or from results bundles "
        "(python src/export.py) and write the measured-vs-reported report (Markdown, HTML, PNG plots), also "
        "logged as the artifacts of a 'report' run when it read a store.",
    )
    parser.add_argument("experiment", help="the MLflow experiment name, e.g. ablation_cpu (experiment=cpu)")
    parser.add_argument(
        "--tracking-uri", help=f"default: {mask_secrets(default_tracking_uri())}; with --from, the store is "
        "read only when this is given"
    )  # fmt: skip
    parser.add_argument(
        "--from", dest="bundles", action="append", type=Path, default=[], metavar="BUNDLE",
        help="read the runs of this results bundle (results/<name>); repeat for several",
    )  # fmt: skip
    parser.add_argument(
        "--allow-seeds-only", action="store_true", help="keep a finished run whose per-image outcomes "
        "cannot be read, its rows on the seeds' noise alone (otherwise: an error that names it)"
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="output folder (default: reports/<experiment>)")
    parser.add_argument("--claims", type=Path, default=CLAIMS_FILE, help="default: %(default)s")
    parser.add_argument(
        "--filter", default="", help="an MLflow search filter, e.g. \"tags.sweep_dir = '...'\""
    )
    parser.add_argument(
        "--min-seeds", type=at_least_two, default=Settings.min_seeds, help="default: %(default)s"
    )
    parser.add_argument(
        "--margin", type=positive, default=Settings.margin, help="points; default: %(default)s"
    )
    parser.add_argument("--no-log", action="store_true", help="do not log a report run to MLflow")
    parser.add_argument(
        "--page", type=Path, help="also write the Markdown, without plots, to this file, and its rows as "
        "JSON beside it (.json)"
    )  # fmt: skip
    parser.add_argument(
        "--readme", type=Path, help="also write every section's primary rows as a table into this file, "
        f"between its lines {README_START} and {README_END}"
    )  # fmt: skip
    parser.add_argument(
        "--ended-before", type=_utc_time, metavar="UTC", help="read only the runs that had ended (finished, "
        "failed or killed) by this UTC time, e.g. 2026-11-30T00:09: the page as it stood then, made again "
        "from a store that has grown since"
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or ROOT / "reports" / args.experiment
    settings = Settings(min_seeds=args.min_seeds, margin=args.margin)
    # With bundles, a store is read only when named; without, the default one, as always.
    uri = args.tracking_uri or (None if args.bundles else default_tracking_uri())
    try:
        rows, runs = make_report(
            args.experiment, uri, out, args.claims, args.filter, not args.no_log, settings, args.page,
            args.ended_before, args.bundles, args.allow_seeds_only, args.readme,
        )  # fmt: skip
    except UserError as err:
        print(f"report: {mask_secrets(str(err))}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"\n{len(runs)} runs read. The report: {out / 'report.md'} (and report.html, with the plots)")
    if args.page is not None:
        print(f"The page: {args.page} (and {args.page.with_suffix('.json')})")
    if args.readme is not None:
        print(f"The primary rows' table: {args.readme}")
    if uri is None and not args.no_log:
        print("Not logged to MLflow: the runs came from bundles alone (add --tracking-uri to log it there)")
    return 0


def _utc_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: write it as 2026-11-30T00:09") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
