"""Export an experiment's runs from MLflow into a results bundle (alexnet.report.bundle), to commit.

python src/export.py ablation_cpu --out results/ablation_cpu
python src/export.py ablation_cpu --ended-before 2026-11-30T01:37:52 --page docs/results.md
python src/report.py ablation_cpu --from results/ablation_cpu --page docs/results.md --no-log
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient

from alexnet.errors import UserError
from alexnet.redaction import mask_secrets
from alexnet.report import bundle
from alexnet.report.claims import ROOT
from alexnet.report.cli import OneLineParser, _utc_time, check_filter, default_tracking_uri, shown
from alexnet.report.runs import search_filter
from alexnet.tracking import check_reachable


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python src/export.py",
        description="Write an experiment's training runs (params, tags, metrics, per-epoch errors, per-image "
        "test outcomes) into a results bundle: new runs are added, runs already there replaced.",
    )
    parser.add_argument("experiment", help="the MLflow experiment name, e.g. ablation_cpu")
    parser.add_argument("--out", type=Path, help="the bundle's folder (default: results/<experiment>)")
    parser.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help=f"default: {mask_secrets(default_tracking_uri())}",
    )
    parser.add_argument("--filter", default="", help="an MLflow search filter, as for python src/report.py")
    parser.add_argument(
        "--ended-before", type=_utc_time, metavar="UTC", help="only the runs that had ended by this UTC "
        "time, e.g. 2026-11-30T00:09 (as for python src/report.py)"
    )  # fmt: skip
    parser.add_argument(
        "--page", type=Path, help="the page this bundle is the source of, e.g. docs/results.md (kept in the "
        "bundle; tests/test_bundle.py makes the page again from it)"
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or ROOT / "results" / args.experiment
    try:
        check_filter(search_filter(args.filter, args.ended_before))
        check_reachable(args.tracking_uri, seconds=5.0)
        page = shown(args.page) if args.page else None
        done = bundle.export(
            MlflowClient(args.tracking_uri), args.experiment, out, args.filter, args.ended_before, page
        )
    except UserError as err:
        print(f"export: {mask_secrets(str(err))}", file=sys.stderr)
        return 2
    for run in done["unreadable"]:
        print(f"export: warning: run {run.name} ({run.run_id}): {run.outcomes_error}; kept without outcomes "
              "(the report refuses it unless --allow-seeds-only)", file=sys.stderr)  # fmt: skip
    print(f"{done['runs']} runs exported ({done['replaced']} replaced) into {out}: {done['total']} runs, "
          f"{done['size'] / 1e6:.2f} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
