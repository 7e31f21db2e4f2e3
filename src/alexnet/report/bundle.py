"""A results bundle: the data behind a report page, kept in the repository (``results/<name>/``) so that the
page can be made again, byte for byte, without the MLflow store it came from.

- ``bundle.json``: the format, the experiment, the page it is the source of (if any), and each export: when,
  at which commit, on which machine, from which store (password masked), with which filter;
- ``runs.json``: per run, its params, its tags (less MLflow's own; passwords masked), its summary metrics,
  the per-epoch histories the report reads (``runs.HISTORY``), and whether its outcomes were kept;
- ``outcomes.npz``: each run's per-image test outcomes, bit-packed (``<run_id>/<view>``).

Exporting into a bundle adds the new runs and replaces those with the same run id, so that a sweep's
finished runs can be exported as it goes on.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import zipfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.search_utils import SearchUtils

from alexnet.errors import ReportError
from alexnet.redaction import mask_secrets
from alexnet.report.claims import ROOT
from alexnet.report.rows import Row
from alexnet.report.runs import (
    RunRecord,
    fetch_runs,
    find_experiment,
    first_line,
    load_outcomes,
    new_record,
    oldest_first,
    search_filter,
)
from alexnet.tracking import git_commit

FORMAT = 1
HEADER, RUNS, OUTCOMES = "bundle.json", "runs.json", "outcomes.npz"


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


def export(
    client: MlflowClient, experiment: str, out: Path, filter_string: str = "",
    ended_before: datetime | None = None, page: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The experiment's training runs (those ``filter_string`` and ``ended_before`` select, as for the
    report) into the bundle at ``out``, created or updated; returns what was done, for the user."""
    header, entries, arrays = _read_existing(out, experiment)
    exp_id = find_experiment(client, experiment)
    runs = fetch_runs(client, exp_id, search_filter(filter_string, ended_before))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    load_outcomes(client, runs)
    replaced = [r.run_id for r in runs if r.run_id in entries]
    for run in runs:
        arrays = {k: v for k, v in arrays.items() if not k.startswith(f"{run.run_id}/")}
        entries[run.run_id], packed = _entry(run)
        arrays |= packed
    header["exports"].append({
        "at": f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}", "commit": git_commit(ROOT),
        "machine": machine(), "store": mask_secrets(client.tracking_uri), "filter": filter_string,
        "ended_before": f"{ended_before:%Y-%m-%dT%H:%M:%S}" if ended_before else None, "runs": len(runs),
    })  # fmt: skip
    header["page"] = page or header.get("page")
    header["runs"] = len(entries)
    ordered = sorted(entries.values(), key=lambda e: (e["start"], e["run_id"]))
    out.mkdir(parents=True, exist_ok=True)
    _write_npz(out / OUTCOMES, arrays)
    _write(out / RUNS, _json(ordered))
    _write(out / HEADER, _json({k: v for k, v in header.items() if v is not None}))  # last: a bundle is whole
    return {"runs": len(runs), "replaced": len(replaced), "total": len(entries),
            "unreadable": [r for r in runs if r.outcomes_error],
            "size": sum((out / name).stat().st_size for name in (HEADER, RUNS, OUTCOMES))}  # fmt: skip


def _entry(run: RunRecord) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A run as ``runs.json`` keeps it, and its packed outcomes."""
    outcomes = None
    if run.outcomes is not None:
        images = {len(v) for v in run.outcomes.values()}
        outcomes = {"images": images.pop(), "labels_sha": run.labels_sha, "views": sorted(run.outcomes)}
    entry = {
        "run_id": run.run_id, "name": run.name, "status": run.status, "start": run.start, "end": run.end,
        "params": {k: mask_secrets(v) for k, v in run.params.items()}, "metrics": run.metrics,
        "tags": {k: mask_secrets(v) for k, v in run.tags.items() if not k.startswith("mlflow.")},
        "history": run.history, "outcomes": outcomes, "outcomes_error": run.outcomes_error,
    }  # fmt: skip
    packed = {f"{run.run_id}/{k}": np.packbits(v) for k, v in (run.outcomes or {}).items()}
    return entry, packed


def _read_existing(
    out: Path, experiment: str
) -> tuple[dict[str, Any], dict[str, dict], dict[str, np.ndarray]]:
    """The bundle already at ``out`` (header, entries by run id, packed outcomes), or an empty one."""
    if not (out / HEADER).is_file():
        if out.is_dir() and any(out.iterdir()):
            raise ReportError(
                f"{out} is a folder with files but no {HEADER}: export into a new or empty folder"
            )
        return {"format": FORMAT, "experiment": experiment, "exports": []}, {}, {}
    header = read_header(out)
    if header["experiment"] != experiment:
        raise ReportError(
            f"{out} holds experiment {header['experiment']!r}, not {experiment!r}: export into another folder"
        )
    entries, arrays = _read_data(out)
    return header, {e["run_id"]: e for e in entries}, arrays


def read_header(path: Path) -> dict[str, Any]:
    """A bundle's ``bundle.json``, checked."""
    if not (path / HEADER).is_file():
        raise ReportError(
            f"{path} is not a results bundle (no {HEADER}): make one with python src/export.py <experiment> "
            f"--out {path}"
        )
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError) as err:
        raise ReportError(
            f"{path / HEADER} cannot be read ({type(err).__name__}: {first_line(err)})"
        ) from None
    if (
        not isinstance(header, dict)
        or header.get("format") != FORMAT
        or not header.get("exports")
        or "experiment" not in header
    ):
        raise ReportError(
            f"{path / HEADER} is not a bundle header of format {FORMAT}: export the bundle again"
        )
    return header


def _read_data(path: Path) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    try:
        entries = json.loads((path / RUNS).read_text())
        with np.load(path / OUTCOMES) as packed:
            arrays = {k: packed[k] for k in packed.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ReportError(
            f"The bundle {path} cannot be read ({type(err).__name__}: {first_line(err)}): export it again"
        ) from None
    return entries, arrays


def load(path: Path) -> list[RunRecord]:
    """A bundle's runs, oldest first, as the report reads them from MLflow."""
    read_header(path)
    entries, arrays = _read_data(path)
    try:
        return oldest_first(_record(e, arrays) for e in entries)
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{path / RUNS} cannot be read ({type(err).__name__}: {first_line(err)})") from None


def _record(entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> RunRecord:
    run = new_record(
        entry["run_id"], entry["name"], entry["status"], entry["start"], entry["end"], entry["params"],
        entry["metrics"], entry["tags"], entry["history"],
    )  # fmt: skip
    run.outcomes_error = entry.get("outcomes_error")
    kept = entry.get("outcomes")
    if kept:
        keys = [f"{run.run_id}/{view}" for view in kept["views"]]
        if all(k in arrays for k in keys):
            n = kept["images"]
            unpacked = (np.unpackbits(arrays[k])[:n].astype(bool) for k in keys)
            run.outcomes = dict(zip(kept["views"], unpacked, strict=True))
            run.labels_sha = kept["labels_sha"]
        else:
            run.outcomes_error = f"its outcomes are missing from {OUTCOMES}"
    return run


def select(runs: Iterable[RunRecord], filter_string: str) -> list[RunRecord]:
    """The runs an MLflow search filter selects, matched by MLflow's own code (as its file store does)."""
    runs = list(runs)
    if not filter_string:
        return runs
    views = [
        SimpleNamespace(
            record=r,
            info=SimpleNamespace(
                run_id=r.run_id,
                run_name=r.name,
                status=r.status,
                start_time=r.start,
                end_time=r.end,
                user_id="",
                lifecycle_stage="active",
                artifact_uri="",
                experiment_id="",
            ),
            data=SimpleNamespace(params=r.params, metrics=r.metrics, tags=r.tags),
            inputs=SimpleNamespace(dataset_inputs=[]),
        )  # fmt: skip
        for r in runs
    ]
    try:
        return [v.record for v in SearchUtils.filter(views, filter_string)]
    except MlflowException as err:
        raise ReportError(f"Cannot search the runs (filter {filter_string!r}): {first_line(err)}") from None


def describe(shown: str, header: dict[str, Any]) -> str:
    """Where a bundle's runs came from, for the page's header: nothing of the machine that reads it."""
    last = header["exports"][-1]
    at = datetime.fromisoformat(last["at"].replace("Z", "+00:00"))
    commit = last["commit"][:12] + ("-dirty" if last["commit"].endswith("-dirty") else "")
    more = f", the last of {len(header['exports'])} exports" if len(header["exports"]) > 1 else ""
    return (f"the bundle {shown} ({header['runs']} runs of experiment {header['experiment']}), exported "
            f"{at:%Y-%m-%d %H:%M} UTC at commit "
            f"`{commit}` from {last['store']}{more}")  # fmt: skip


def page_json(rows: list[Row]) -> str:
    """The page's rows, machine-readable: a ratio's numbers as ratios (as the page shows them), the rest in
    points of error."""

    def number(value: float | None, ratio: bool = False) -> float | None:
        if value is None or not math.isfinite(value):
            return None
        return round(math.exp(value) if ratio else value, 4)

    return _json(
        [
            {
                "claim": row.claim.name,
                "title": row.claim.title,
                "label": row.label,
                "section": row.section,
                "metric": row.metric,
                "primary": row.primary,
                "unit": row.unit,
                "paper": number(row.reported),
                "mean": number(row.estimate.mean, row.unit == "x"),
                "lo": number(row.estimate.low, row.unit == "x"),
                "hi": number(row.estimate.high, row.unit == "x"),
                "n": row.estimate.n,
                "verdict": row.verdict,
                "verdict_adjusted": row.adjusted_verdict,
                "mde": number(row.mde, row.unit == "x"),
                "seeds_for_80": row.seeds_needed,
                "seeds_for_80_holm": row.seeds_needed_holm,
            }  # fmt: skip
            for row in rows
        ]
    )


def _json(data: Any) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a reader never sees half a file."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez_compressed writes, but with fixed entry times and order, so that the same outcomes give
    the same bytes (a bundle exported again changes in git only where its runs did)."""
    part = path.with_name(path.name + ".part")
    with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, buffer.getvalue())
    part.replace(path)
