"""The measured-vs-reported report: known numbers in an MLflow store give known deltas, intervals and
verdicts; a real toy multirun (with one failing job) gives a report that shows the gap."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from scipy import stats

from alexnet.report import ROOT, load_claims, make_report, t_interval, verdict

T2 = stats.t.ppf(0.975, 2)  # 4.303: the 95% t quantile for 3 seeds

BASE = {  # the paper arm's parameters, as train.py logs them (every value a string)
    "model.arch": "alexnet",
    "data.dataset": "cifar10",
    "model.input_size": "32",
    "model.width": "0.25",
    "data.train_size": "8000",
    "trainer.max_epochs": "5",
    "optimizer.lr": "0.01",
    "model.lrn": "True",
    "model.pool": "overlapping",
    "model.activation": "relu",
    "data.root": "/somewhere/cifar10",
}


def log_run(client, exp_id, factor, level, seed, params, metrics, status="FINISHED", tags=None):
    run = client.create_run(
        exp_id,
        run_name=f"{factor}={level} seed={seed}",
        tags={"ablation.factor": factor, "ablation.level": level, "seed": str(seed), **(tags or {})},
    )
    for key, value in {**params, "seed": str(seed)}.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def known_store(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("known", artifact_location=str(tmp_path / "artifacts"))
    paper = {1: 0.40, 2: 0.42, 3: 0.41}
    for seed, err in paper.items():
        log_run(
            client,
            exp,
            "paper",
            "paper",
            seed,
            BASE,
            {
                "test/top1_err_1crop": err,
                "test/top5_err_1crop": err / 4,
                "test/top1_err_10crop": err - 0.01,  # exactly 1 point better with ten views
                "test/top5_err_10crop": err / 4,
            },
        )
    # LRN off is worse by 3, 2, 4 points: mean -3, sd 1.
    for seed, d in {1: 0.03, 2: 0.02, 3: 0.04}.items():
        log_run(
            client,
            exp,
            "lrn",
            "off",
            seed,
            {**BASE, "model.lrn": "False"},
            {"test/top1_err_1crop": paper[seed] + d},
        )
    # Non-overlapping pooling is better by 2, 3, 4 points: the opposite of the paper.
    for seed, d in {1: 0.02, 2: 0.03, 3: 0.04}.items():
        params = {**BASE, "model.pool": "non_overlapping"}
        log_run(
            client, exp, "pooling", "non_overlapping", seed, params, {"test/top1_err_1crop": paper[seed] - d}
        )
    # A failed LRN-off run: listed and counted, never dropped.
    log_run(
        client,
        exp,
        "lrn",
        "off",
        4,
        {**BASE, "model.lrn": "False"},
        {},
        status="FAILED",
        tags={"error": "RuntimeError: out of memory"},
    )
    # The same claim at another scale (width 0.5): its own table, never mixed with width 0.25.
    for seed in (1, 2):
        wide = {**BASE, "model.width": "0.5"}
        log_run(client, exp, "paper", "paper", seed, wide, {"test/top1_err_1crop": 0.30})
        log_run(
            client, exp, "lrn", "off", seed, {**wide, "model.lrn": "False"}, {"test/top1_err_1crop": 0.30}
        )
    # Figure 1: ReLU at lr 0.03 takes 2, 2.2, 1.8 epochs (its best); tanh's best (0.03) 10, 11, 9: 5x.
    fig1 = {**BASE, "model.arch": "figure1_cnn", "model.width": "1.0", "trainer.max_epochs": "40"}
    epochs = {
        ("paper", "paper", "0.01"): (4.0, 4.0, 4.0),
        ("paper", "paper", "0.03"): (2.0, 2.2, 1.8),
        ("activation", "tanh", "0.01"): (12.0, 13.0, 11.0),
        ("activation", "tanh", "0.03"): (10.0, 11.0, 9.0),
    }
    for (factor, level, lr), values in epochs.items():
        params = {**fig1, "optimizer.lr": lr, "model.activation": "relu" if factor == "paper" else "tanh"}
        for seed, e in zip((1, 2, 3), values, strict=True):
            log_run(client, exp, factor, level, seed, params, {"final/epochs_to_target": e})
    # A tanh learning rate that never reached 25%: counts as its 40 epochs, so it is not the best.
    for seed in (1, 2, 3):
        params = {**fig1, "optimizer.lr": "0.003", "model.activation": "tanh"}
        log_run(client, exp, "activation", "tanh", seed, params, {}, tags={"epochs_to_target": "never"})
    return uri, client


def rows_by(rows, claim, metric=None, width="0.25"):
    return [
        r
        for r in rows
        if r.claim.name == claim
        and (metric is None or r.measure.metric == metric)
        and f"width={width}" in r.section
    ]


def test_known_numbers_give_known_deltas_intervals_and_verdicts(known_store, tmp_path: Path):
    uri, client = known_store
    rows, runs = make_report("known", uri, tmp_path / "out")

    (lrn,) = rows_by(rows, "lrn", "test/top1_err_1crop")
    half = T2 * 1.0 / math.sqrt(3)
    assert lrn.estimate.n == 3
    assert lrn.estimate.mean == pytest.approx(-3.0)
    assert (lrn.estimate.low, lrn.estimate.high) == pytest.approx((-3.0 - half, -3.0 + half))
    assert lrn.verdict == "reproduced"
    assert lrn.size == "yes"  # the paper's -1.4 lies in [-5.48, -0.52]
    assert [r.status for r in lrn.not_finished] == ["FAILED"]

    (pool,) = rows_by(rows, "pooling", "test/top1_err_1crop")
    assert pool.estimate.mean == pytest.approx(3.0)
    assert pool.verdict == "opposite"
    assert pool.size == "no"

    (ten,) = rows_by(rows, "ten_crop", "test/top1_err_10crop")
    assert (ten.estimate.mean, ten.estimate.low, ten.estimate.high) == pytest.approx((-1.0, -1.0, -1.0))
    assert ten.verdict == "reproduced" and ten.size == "no"  # the paper's -1.5 is outside

    # Claims whose other arm was not run (top-5 of LRN has no ablated value) give n = 0, inconclusive.
    (lrn5,) = rows_by(rows, "lrn", "test/top5_err_1crop")
    assert lrn5.estimate.n == 0 and lrn5.verdict == "inconclusive"
    assert not rows_by(rows, "columns")  # never run: no row

    # The width-0.5 runs are their own comparison: identical errors, so a zero-width interval at 0.
    (wide,) = rows_by(rows, "lrn", "test/top1_err_1crop", width="0.5")
    assert wide.estimate.n == 2 and wide.estimate.mean == 0.0 and wide.verdict == "inconclusive"
    assert wide.section != lrn.section

    (fig1,) = rows_by(rows, "figure1", width="1.0")
    assert fig1.estimate.mean == pytest.approx(5.0)
    assert (fig1.estimate.low, fig1.estimate.high) == pytest.approx((5.0, 5.0))
    assert fig1.verdict == "reproduced" and fig1.size == "no"  # ~6x lies outside [5, 5]
    assert any("best optimizer.lr/optimizer.min_lr = 0.03," in note for note in fig1.notes)

    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    assert "| Local response normalization | 3.3 |" in md
    assert "-3.00 [-5.48, -0.52]" in md and "**reproduced**" in md and "**opposite**" in md
    assert "RuntimeError: out of memory" in md  # the failed run, listed
    assert "Verdict rule" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and "Local response normalization" in html and "out of memory" in html
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "figure1_0.png" in pngs and any(p.startswith("deltas_") for p in pngs)
    for png in pngs:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # The report is also a run of its own, with every file as an artifact; reading the store again ignores it.
    exp = client.get_experiment_by_name("known")
    (report_run,) = client.search_runs([exp.experiment_id], "tags.`alexnet.report` = 'true'")
    assert report_run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert {"report.md", "report.html", "claims.yaml", *pngs} <= artifacts
    assert report_run.data.tags["verdict.lrn.test_top1_err_1crop." + lrn.context] == "reproduced"
    rows_again, runs_again = make_report("known", uri, tmp_path / "out2", log_to_mlflow=False)
    assert len(runs_again) == len(runs)


def test_interval_and_verdict_rule():
    est = t_interval([-2.0, -3.0, -4.0])
    assert est.mean == pytest.approx(-3.0)
    assert est.high == pytest.approx(-3.0 + T2 / math.sqrt(3))
    assert verdict(est, -1) == "reproduced" and verdict(est, +1) == "opposite"
    assert verdict(t_interval([-1.0, 1.0, 0.5]), -1) == "inconclusive"
    assert verdict(t_interval([-5.0]), -1) == "inconclusive"  # one seed: no interval, no verdict


def test_every_claim_is_data_with_a_section_and_an_arm():
    claims = {c.name: c for c in load_claims()}
    assert {"figure1", "lrn", "pooling", "columns", "pca_color", "crops_flips", "dropout", "ten_crop"} <= set(
        claims
    )
    assert claims["lrn"].measures[0].reported == -1.4 and claims["lrn"].section == "3.3"
    assert claims["columns"].measures[0].reported == -1.7
    assert claims["figure1"].measures[0].reported == 6.0 and claims["figure1"].kind == "ratio"
    for claim in claims.values():
        assert claim.section and claim.paper_data


def test_unknown_experiment_is_explained(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "report.py"),
            "nope",
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "No experiment 'nope'" in proc.stderr and "+ablation=" in proc.stderr


def test_real_ablation_multirun_with_a_failing_job_and_its_report(train_run, tmp_path: Path):
    """2 arms x 2 seeds of `+ablation=lrn` at toy size, plus a job that fails at run time (seed -1 is out of
    numpy's range): the sweep finishes the other jobs, and the report counts and lists the failed one."""
    proc = train_run(
        "+ablation=lrn",
        "experiment=smoke",
        "logger.experiment_name=toy",
        "data.synthetic_size=64",
        "seed=1,2,-1",
        multirun=True,
        check=False,
    )
    assert proc.returncode != 0  # the failing job is reported at the end of the sweep...
    runs = train_run.runs("toy")
    by_arm = {(r.data.tags["ablation.factor"], r.data.tags["seed"]): r.info.status for r in runs}
    assert by_arm == {  # ...after every other job ran
        ("paper", "1"): "FINISHED",
        ("paper", "2"): "FINISHED",
        ("paper", "-1"): "FAILED",
        ("lrn", "1"): "FINISHED",
        ("lrn", "2"): "FINISHED",
        ("lrn", "-1"): "FAILED",
    }
    for r in runs:
        assert r.data.params["model.lrn"] == (
            "True" if r.data.tags["ablation.factor"] == "paper" else "False"
        )
        assert r.data.tags["ablation.level"] in ("paper", "off")

    out = tmp_path / "report"
    report = subprocess.run(
        [sys.executable, str(ROOT / "src" / "report.py"), "toy", "--tracking-uri", train_run.tracking_uri]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    md = (out / "report.md").read_text()
    lrn_row = next(line for line in md.splitlines() if line.startswith("| Local response normalization"))
    assert "| 2 (+2 not finished) |" in lrn_row
    assert "-1 is not in bounds" in md  # the failed jobs and why
    assert md.count("| FAILED |") == 2
    assert (out / "report.html").is_file() and list(out.glob("deltas_*.png"))
