"""The speed benchmarks run in their smoke modes, and the tables they print add up: every setup is there,
every images/s is positive, and every ratio is the ratio of the printed images/s (within their rounding)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

BARE_NEW = "bare step, new default (channels_last, current LRN)"
BARE_OLD = "bare step, old default (NCHW, LRN as at 03be689)"
LOOP = "whole Lightning loop, new default"
# Each ratio: (numerator row, denominator row, target).
RATIOS = {"loop / bare": (LOOP, BARE_NEW, 0.9), "new / old": (BARE_NEW, BARE_OLD, 1.25)}


def rounding_slack(top: float, bottom: float, speed_digits: int = 1, ratio_digits: int = 2) -> float:
    """How far a printed ratio may be from top/bottom of the printed images/s, from rounding alone."""
    h = 0.5 * 10**-speed_digits
    return 0.5 * 10**-ratio_digits + (h + top / bottom * h) / (bottom - h) + 1e-9


def training_tables(stdout: str) -> dict[str, tuple[dict[str, float], dict[str, tuple[float, str]]]]:
    """{width: ({setup: images/s}, {ratio: (value, verdict)})} from training_speed.py's output."""
    tables: dict[str, tuple[dict, dict]] = {}
    speeds: dict[str, float] = {}
    ratios: dict[str, tuple[float, str]] = {}
    for line in stdout.splitlines():
        if m := re.fullmatch(r"width (\S+)", line.strip()):
            speeds, ratios = {}, {}
            tables[m.group(1)] = (speeds, ratios)
        elif m := re.fullmatch(r"\s+(.+?)\s+(-?\d+\.\d)", line):
            speeds[m.group(1)] = float(m.group(2))
        elif m := re.fullmatch(r"\s+(\S+ / \S+) \(.*\)\s+(\d+\.\d\d)x\s+>= (\S+) (met|MISSED)", line):
            ratios[m.group(1)] = (float(m.group(2)), m.group(4))
            assert float(m.group(3)) == RATIOS[m.group(1)][2], line
    return tables


def test_training_speed_smoke_prints_a_table_that_adds_up():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "training_speed.py"), "--smoke", "--check"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    tables = training_tables(out)
    assert list(tables) == ["0.125"], out
    speeds, ratios = tables["0.125"]
    assert set(speeds) == {BARE_NEW, BARE_OLD, LOOP}, out
    assert all(v > 0 for v in speeds.values()), out
    assert set(ratios) == set(RATIOS), out
    for name, (top, bottom, target) in RATIOS.items():
        value, verdict = ratios[name]
        expected = speeds[top] / speeds[bottom]
        assert abs(value - expected) <= rounding_slack(speeds[top], speeds[bottom]), (name, value, expected)
        if abs(value - target) > 0.005:  # at the boundary the unrounded value decides
            assert verdict == ("met" if value >= target else "MISSED"), (name, value, verdict)
    # --check: exit 1 exactly when a target is missed, and say which.
    missed = any(verdict == "MISSED" for _, verdict in ratios.values())
    assert proc.returncode == (1 if missed else 0), out
    assert ("targets missed: width 0.125" in out) == missed, out
    # Where and how it was measured, and what the loop's timed span holds.
    assert re.search(r"torch \S+; 2 threads|torch \S+; \d+ threads", out) and "CPU " in out, out
    assert re.search(r"date \d{4}-\d\d-\d\d", out), out
    assert "checkpoint saving, validation and epoch-end logging inside the timed span" in out, out
    assert re.search(r"loop's timed epochs: \d+% training batches, \d+% validation, \d+% epoch end", out)


def device_rows(text: str) -> dict[str, tuple[float, float]]:
    """{setup: (images/s, ratio)} from device_speed.py's table."""
    rows = {}
    for line in text.splitlines():
        if m := re.fullmatch(r"(.+?)\s+(\d+\.\d)\s+(\d+\.\d\d)x", line.rstrip()):
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def check_device_table(text: str) -> None:
    rows = device_rows(text)
    prefixes = ("one device, fp32, NCHW", "one column", "model parallel", "bf16 autocast",
                "channels_last", "bf16 autocast + channels_last", "DDP x1")  # fmt: skip
    for prefix in prefixes:
        assert any(label.startswith(prefix) for label in rows), (prefix, text)
    assert len(rows) == 7, text
    (base,) = [speed for label, (speed, _) in rows.items() if label.startswith("one device, fp32, NCHW")]
    for label, (speed, ratio) in rows.items():
        assert speed > 0, (label, text)
        assert abs(ratio - speed / base) <= rounding_slack(speed, base), (label, speed, base, ratio)


@pytest.mark.slow
def test_gpu_session_smoke_leaves_the_device_table_the_runs_and_the_report(tmp_path: Path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_SESSION_WORK": str(work), "PYTHON": sys.executable}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_session.sh"), "--smoke"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )  # fmt: skip
    log = (out / "session.log").read_text()
    assert proc.returncode == 0, log[-5000:] + proc.stderr[-3000:]
    assert "every step succeeded" in log
    for step in ("device_speed", "claim", "report"):
        assert re.search(rf"{step}: exit 0 after \d+ s", log), (step, log[-3000:])
    check_device_table((out / "device_speed.txt").read_text())
    # The claim: 2 arms x 2 seeds, all finished, in the store under $OUT.
    with sqlite3.connect(out / "mlflow.db") as db:
        runs = db.execute(
            "SELECT r.status, a.value, s.value FROM runs r "
            "JOIN tags a ON a.run_uuid = r.run_uuid AND a.key = 'ablation.level' "
            "JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'seed'"
        ).fetchall()
    assert sorted(runs) == sorted(
        ("FINISHED", level, seed) for level in ("paper", "off") for seed in ("1", "2")
    ), runs
    report = (out / "report" / "report.md").read_text()
    assert "experiment smoke" in report and "Local response normalization" in report
    assert re.search(r"\| Local response normalization \| 3\.3 \| test/top1_err_1crop \| .* \| 2 \|", report)
    # What the device tool brings back: at most 8 files, none deeper than 2 folders.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files


PROFILE_CATEGORIES = (
    "conv forward", "conv backward", "LRN (forward + backward)", "pooling (forward + backward)",
    "fully connected (fwd + bwd)", "other (ReLU, dropout, loss, flatten, autograd)",
    "optimizer step (zero_grad + SGD)", "data (loader + augmentation)",
)  # fmt: skip


def test_profile_step_smoke_prints_every_category_a_peak_and_the_fraction_of_it():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "profile_step.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = re.search(r"fp32 peak \(matmul\), 1 thread\(s\): .*: (\d+\.\d) GFLOP/s", out)
    assert peak and float(peak.group(1)) > 0, out
    assert re.search(r"^width 0\.125$", out, re.M), out
    flops = re.search(r"FLOPs per training image .*: (\d\.\d{4}) GFLOP = conv (\d\.\d{4})", out)
    assert flops and float(flops.group(1)) >= float(flops.group(2)) > 0, out
    shares = {}
    for category in PROFILE_CATEGORIES:
        row = re.search(rf"^  {re.escape(category)}\s+(\d+\.\d)\s+(\d+\.\d)\s+(\S+)$", out, re.M)
        assert row, (category, out)
        shares[category] = float(row.group(2))
    assert abs(sum(shares.values()) - 100) <= 0.1 * len(shares), shares  # each share rounded to 0.1
    default = re.search(
        r"eager, channels_last \(the default\)\s+(\d+\.\d)\s+(\d+\.\d)\s+(\d+\.\d)%\s+1\.00x", out
    )
    assert default and float(default.group(1)) > 0, out
    assert re.search(r"eager, NCHW .* (yes|NO) \(", out), out  # checked against the default and float64
    fraction = re.search(r"bare step \(default\): (\d+\.\d) GFLOP/s = (\d+\.\d)% of the measured peak", out)
    assert (
        fraction
        and abs(float(fraction.group(1)) / float(peak.group(1)) * 100 - float(fraction.group(2))) < 0.2
    )
    assert re.search(r"date \d{4}-\d\d-\d\d", out) and "commit " in out, out
