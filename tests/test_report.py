"""The measured-vs-reported report: an MLflow store with known per-image outcomes gives known effects,
intervals, verdicts (raw and after Holm) and power; real toy multiruns (one claim with a failing job, and a
whole factorial design) give reports that show them."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from scipy import stats as scipy_stats
from statsmodels.stats.power import TTestPower

from alexnet.report.claims import load_arm, load_claims
from alexnet.report.cli import ROOT, main, make_report
from alexnet.report.document import missing_command, primary_table
from alexnet.tracking import OUTCOMES_ARTIFACT, labels_digest

IMAGES = 2000
BASE = {  # the paper arm's experiment params, as train.py logs them (every value a string)
    "model.arch": "alexnet",
    "data.dataset": "cifar10",
    "data.fingerprint": "0123456789abcdef",
    "model.input_size": "32",
    "model.width": "0.25",
    "trainer.max_epochs": "6",
    "optimizer.lr": "0.01",
    "model.lrn": "True",
    "model.pool": "overlapping",
    "model.activation": "relu",
    "model.columns": "2",
}
LABELS = np.arange(IMAGES) % 10


def outcomes(errors: np.ndarray) -> dict[str, np.ndarray]:
    wrong = errors.astype(bool)
    return {"top1_1crop": ~wrong, "top5_1crop": np.ones(IMAGES, bool), "top1_10crop": ~wrong,
            "top5_10crop": np.ones(IMAGES, bool)}  # fmt: skip


def log_run(client, exp_id, seed, params, errors=None, status="FINISHED", tags=None, metrics=None):
    """A run as train.py leaves it: params, the test metrics, and (given ``errors``, 0/1 per test image) the
    per-image outcomes artifact."""
    run = client.create_run(exp_id, tags={"seed": str(seed), **(tags or {})})
    run_id = run.info.run_id
    for key, value in {**params, "seed": str(seed)}.items():
        client.log_param(run_id, key, value)
    if errors is not None:
        client.log_metric(run_id, "test/top1_err_1crop", float(errors.mean()))
        client.log_metric(run_id, "test/top1_err_10crop", float(errors.mean()))
        client.log_metric(run_id, "test/top5_err_1crop", 0.0)
        client.log_metric(run_id, "test/top5_err_10crop", 0.0)
        buffer = io.BytesIO()
        packed = {k: np.packbits(v) for k, v in outcomes(errors).items()}
        np.savez_compressed(buffer, images=np.int64(IMAGES), labels_sha=labels_digest(LABELS), **packed)
        path = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / OUTCOMES_ARTIFACT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status)
    return run_id


def errors_with(rng, rate: float, shared: np.ndarray | None = None, flip: float = 0.0) -> np.ndarray:
    """0/1 errors at about ``rate``; with ``shared``, the same images wrong except a fraction ``flip``."""
    if shared is None:
        return (rng.random(IMAGES) < rate).astype(float)
    out = shared.copy()
    change = rng.random(IMAGES) < flip
    out[change] = (rng.random(change.sum()) < rate).astype(float)
    return out


@pytest.fixture
def known_store(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("known", artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(0)
    paper, lrn_off, pool = {}, {}, {}
    for seed in (1, 2, 3, 4):
        paper[seed] = errors_with(rng, 0.30)
        log_run(client, exp, seed, BASE, paper[seed])
        # LRN off: the same hard images, plus about 3 points more errors.
        lrn_off[seed] = np.maximum(paper[seed], rng.random(IMAGES) < 0.045)
        log_run(client, exp, seed, {**BASE, "model.lrn": "False"}, lrn_off[seed])
        # Non-overlapping pooling: almost the same network, the same errors but a few flips: no effect.
        pool[seed] = errors_with(rng, 0.30, paper[seed], flip=0.02)
        log_run(client, exp, seed, {**BASE, "model.pool": "non_overlapping"}, pool[seed])
    # A failed LRN-off run: listed and counted, never dropped.
    log_run(client, exp, 5, {**BASE, "model.lrn": "False"}, status="FAILED",
            tags={"error": "RuntimeError: out of memory"})  # fmt: skip
    # The same claim at another scale (width 0.5), 2 seeds whose deltas tie: its own table, an interval of
    # non-zero width, and no verdict (n < 3).
    wide = {**BASE, "model.width": "0.5"}
    for seed in (1, 2):
        base = errors_with(rng, 0.25)
        log_run(client, exp, seed, wide, base)
        worse = base.copy()
        worse[np.flatnonzero(base == 0)[seed * 7 : seed * 7 + 2]] = 1  # exactly 2 more errors each seed
        log_run(client, exp, seed, {**wide, "model.lrn": "False"}, worse)
    # Runs from before per-image outcomes were kept (the columns claim, at 5 epochs): seeds only, said so.
    old = {**BASE, "trainer.max_epochs": "5"}
    for seed, (a, b) in {1: (0.30, 0.33), 2: (0.31, 0.33), 3: (0.29, 0.32)}.items():
        log_run(client, exp, seed, old, metrics={"test/top1_err_1crop": a})
        log_run(client, exp, seed, {**old, "model.columns": "1"}, metrics={"test/top1_err_1crop": b})
    return uri, client, {"paper": paper, "lrn_off": lrn_off, "pool": pool}


def anova(z: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of a seeds x images matrix under the crossed random-effects model (the images'
    part floored at 0)."""
    s, i = z.shape
    grand = z.mean()
    ms_s = i * ((z.mean(1) - grand) ** 2).sum() / (s - 1)
    ms_i = s * ((z.mean(0) - grand) ** 2).sum() / (i - 1)
    resid = z - z.mean(1, keepdims=True) - z.mean(0, keepdims=True) + grand
    ms_e = (resid**2).sum() / ((s - 1) * (i - 1))
    return grand, math.sqrt((ms_s + max(ms_i - ms_e, 0.0)) / (s * i))


def rows_of(rows, claim, metric="test/top1_err_1crop", width="0.25", epochs="6"):
    scale = (f"width={width}", f"max_epochs={epochs}")
    return [
        r
        for r in rows
        if r.claim.name == claim and r.label.startswith(metric) and all(s in r.section for s in scale)
    ]


def test_known_outcomes_give_known_intervals_verdicts_and_power(known_store, tmp_path: Path):
    uri, client, errors = known_store
    rows, runs = make_report("known", uri, tmp_path / "out")

    (lrn,) = rows_of(rows, "lrn")
    z = 100 * np.stack([errors["paper"][s] - errors["lrn_off"][s] for s in (1, 2, 3, 4)])
    mean, se = anova(z)
    assert lrn.estimate.n == 4 and lrn.estimate.method == "seeds x images"
    assert lrn.estimate.mean == pytest.approx(mean) and lrn.estimate.se == pytest.approx(se, rel=1e-6)
    half = scipy_stats.t.ppf(0.975, lrn.estimate.df) * se
    assert (lrn.estimate.low, lrn.estimate.high) == pytest.approx((mean - half, mean + half))
    assert lrn.estimate.high < -1.4  # about 3 points worse without LRN: more than the paper's 1.4
    assert lrn.verdict == lrn.adjusted_verdict == "reproduced"
    # The MDE has 80% power by statsmodels' own one-sample t power at these degrees of freedom.
    nobs = lrn.estimate.df + 1
    power = TTestPower().power(effect_size=lrn.mde / (se * math.sqrt(nobs)), nobs=nobs, alpha=0.05)
    assert power == pytest.approx(0.80, abs=1e-4)
    assert lrn.seeds_needed is not None and lrn.seeds_needed <= 4  # the paper's 1.4 is easy to see here
    assert [r.status for r in lrn.not_finished] == ["FAILED"]
    assert lrn.correlation[0] > 0.5  # the arms share their hard images

    (pool,) = rows_of(rows, "pooling")
    assert abs(pool.estimate.mean) < 0.5
    assert pool.verdict == "no effect" or pool.verdict == "smaller than reported"
    assert pool.estimate.high - pool.estimate.low > 0

    (tied,) = rows_of(rows, "lrn", width="0.5")
    assert tied.per_seed == pytest.approx({1: -0.1, 2: -0.1})  # equal per-seed deltas
    assert tied.estimate.high - tied.estimate.low > 0.05  # the images still make an interval
    assert tied.verdict == "inconclusive" and tied.estimate.n == 2  # and 2 seeds decide nothing

    (old,) = rows_of(rows, "columns", epochs="5")
    assert old.estimate.method == "seeds only" and any("per-image" in n for n in old.notes)

    (ten,) = rows_of(rows, "ten_crop", "test/top1_err_10crop")
    assert ten.estimate.mean == 0.0  # the fake runs' ten views equal their centre crops

    md = (tmp_path / "out" / "report.md").read_text()
    assert "How to read this report" in md and "Holm" in md and "seeds - 1" in md
    assert "RuntimeError: out of memory" in md
    assert "| Local response normalization | 3.3 |" in md
    # each seed's delta beside the two errors it subtracts
    paper1, off1 = 100 * errors["paper"][1].mean(), 100 * errors["lrn_off"][1].mean()
    assert f"seed 1: {paper1 - off1:+.2f} ({paper1:.2f} - {off1:.2f})" in md
    # what 80% power after Holm would cost: those seeds times the row's two arms, at its runs' median time
    holm = lrn.seeds_needed_holm
    assert holm is not None and holm >= lrn.seeds_needed
    minutes = 60 * holm * 2 * np.median([(r.end - r.start) / 3_600_000 for r in lrn.runs])
    noise = f"| {lrn.seeds_needed} | {holm} | {2 * holm} runs, {minutes:.0f} min |"
    assert any(line.startswith("| Local response normalization | test/top1_err_1crop") and
               line.endswith(noise) for line in md.splitlines())  # fmt: skip
    rows_md = [line for line in md.splitlines() if line.startswith("|")]
    assert not any("python src/report.py" in row for row in rows_md)  # a row's command is a training command
    # The README's table: each section's primary rows together, named by what tells the sections apart.
    table = primary_table(rows)
    labels = [cells[0] for cells in table.rows]
    assert table.header[0] == "runs with" and len(set(labels)) > 1
    assert all(labels.index(label) + labels.count(label) - 1 == max(
        i for i, x in enumerate(labels) if x == label) for label in labels)  # fmt: skip
    html = (tmp_path / "out" / "report.html").read_text()
    assert (
        "<table>" in html and "Local response normalization" in html and "<code>python src/train.py" in html
    )
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs and all((tmp_path / "out" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)

    # The report is also a run of its own: every file, each row's verdicts and power; rereading ignores it.
    exp = client.get_experiment_by_name("known")
    (report_run,) = client.search_runs([exp.experiment_id], "tags.`alexnet.report` = 'true'")
    tags, metrics = report_run.data.tags, report_run.data.metrics
    assert tags[f"verdict.{lrn.key}"] == "reproduced" and tags[f"verdict_holm.{lrn.key}"] == "reproduced"
    assert metrics[f"mde.{lrn.key}"] == pytest.approx(lrn.mde) and metrics[
        f"mean.{lrn.key}"
    ] == pytest.approx(mean)
    assert {"report.md", "report.html", "claims.yaml", *pngs} <= {
        a.path for a in client.list_artifacts(report_run.info.run_id)
    }
    _, runs_again = make_report("known", uri, tmp_path / "out2", log_to_mlflow=False)
    assert len(runs_again) == len(runs)


def test_the_family_is_declared_and_another_protocol_never_changes_a_primary_verdict(
    known_store, tmp_path: Path
):
    """Holm runs within a section's primary rows (each claim's primary metric in conf/claims.yaml) and, apart,
    its secondary rows. Runs of another protocol in the same experiment, however many and however decisive,
    leave every primary p-value and verdict of this one as it was."""
    uri, client, _ = known_store
    before, _ = make_report("known", uri, tmp_path / "before", log_to_mlflow=False)
    mine = [r for r in before if "max_epochs=6" in r.section and "width=0.25" in r.section]
    assert {(r.claim.name, r.metric, r.primary) for r in mine} >= {
        ("lrn", "test/top1_err_1crop", True), ("lrn", "test/top5_err_1crop", False),
        ("ten_crop", "test/top1_err_10crop", True), ("ten_crop", "test/top5_err_10crop", False),
    }  # fmt: skip
    lrn = next(r for r in mine if r.claim.name == "lrn" and r.primary)
    family = [r for r in mine if r.primary]
    finite = sum(math.isfinite(getattr(r.test, h)) for r in family for h in ("p_zero", "p_paper", "p_equiv"))
    assert lrn.test.adjusted["p_zero"] == pytest.approx(min(1.0, lrn.test.p_zero * finite), rel=1e-9) or (
        lrn.test.adjusted["p_zero"] >= lrn.test.p_zero
    )
    exp = client.get_experiment_by_name("known").experiment_id
    rng = np.random.default_rng(7)
    other = {**BASE, "trainer.max_epochs": "20"}  # another protocol: another section
    for seed in (1, 2, 3, 4, 5):
        base = errors_with(rng, 0.2)
        log_run(client, exp, seed, other, base)
        log_run(client, exp, seed, {**other, "model.pool": "non_overlapping"}, np.maximum(base, rng.random(
            IMAGES) < 0.1))  # fmt: skip
    after, _ = make_report("known", uri, tmp_path / "after", log_to_mlflow=False)
    assert any("max_epochs=20" in r.section for r in after)
    again = {(r.key, r.metric): r for r in after}
    for row in mine:
        twin = again[(row.key, row.metric)]
        assert twin.test.adjusted == row.test.adjusted
        assert (twin.verdict, twin.adjusted_verdict) == (row.verdict, row.adjusted_verdict)


def test_every_claim_is_data_with_a_section_and_an_arm():
    claims = {c.name: c for c in load_claims()}
    names = {
        "figure1",
        "lrn",
        "pooling",
        "columns",
        "pca_color",
        "crops_flips",
        "dropout",
        "ten_crop",
        "depth",
    }
    assert names | {"factorial"} <= set(claims)
    assert claims["lrn"].measures[0].reported == -1.4 and claims["lrn"].section == "3.3"
    assert claims["columns"].measures[0].reported == -1.7
    assert claims["depth"].arms == ("no_conv3", "no_conv4", "no_conv5")
    assert claims["figure1"].measures[0].reported == 6.0 and claims["figure1"].selection_seeds == (101, 102)
    assert claims["factorial"].design().resolution == 4
    for claim in claims.values():
        assert claim.section and claim.paper_data


def test_a_claim_without_runs_is_named_at_the_preset_made_for_it_at_this_scale():
    """Figure 1 has its own CPU scale (experiment=cpu_figure1): a report over experiment=cpu runs names it,
    and keeps the others' scale as it is."""
    claims = {c.name: c for c in load_claims()}
    base = "experiment=cpu logger.experiment_name=mine"
    assert missing_command(claims["figure1"], base) == (
        "python src/train.py -m +ablation=figure1 experiment=cpu_figure1 logger.experiment_name=mine"
    )
    assert missing_command(claims["lrn"], base) == (
        "python src/train.py -m +ablation=lrn experiment=cpu logger.experiment_name=mine"
    )
    smoke = "experiment=smoke data.synthetic_size=64"
    assert smoke in missing_command(claims["figure1"], smoke)  # no smoke_figure1 preset


def test_unknown_experiment_is_explained(tmp_path: Path, capsys):
    assert main(["nope", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err
    assert "No experiment 'nope'" in err and "+ablation=" in err


def test_a_page_made_again_later_reads_only_the_runs_that_had_ended_by_its_time(tmp_path: Path, capsys):
    """Runs keep arriving in a shared store: --ended-before makes the page as it stood at a time, without the
    runs that ended later or are still going; the page's header names the option, so the command it shows
    is the one that remakes it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("growing", artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(4)
    for seed in (1, 2, 3):
        log_run(client, exp, seed, BASE, errors_with(rng, 0.30))
        log_run(client, exp, seed, {**BASE, "model.lrn": "False"}, errors_with(rng, 0.33))
    cut = max(r.info.end_time for r in client.search_runs([exp])) + 1000  # ms
    later = {}
    for seed in (4, 5):  # begun before the cut: seed 4 ends after it, seed 5 is still going
        later[seed] = client.create_run(exp, start_time=cut - 500, tags={"seed": str(seed)}).info.run_id
        client.log_param(later[seed], "seed", str(seed))
    client.set_terminated(later[4], "FINISHED", end_time=cut + 1000)
    stamp = f"{datetime.fromtimestamp(cut / 1000, timezone.utc):%Y-%m-%dT%H:%M:%S}"
    page = tmp_path / "page.md"
    args = ["growing", "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--no-log", "--page", str(page)]
    assert main([*args, "--ended-before", stamp]) == 0
    assert "6 runs read" in capsys.readouterr().out
    text = page.read_text()
    assert f"`python src/report.py growing --ended-before {stamp}` at commit" in text
    assert "6 training runs (6 finished)" in text and "None: every run finished." in text
    assert main(args) == 0 and "8 runs read" in capsys.readouterr().out  # without it: both later runs
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--ended-before", "yesterday"])
    assert exit_.value.code == 2 and "'yesterday' is not a time" in capsys.readouterr().err


def report_of(train_run, tmp_path: Path, experiment: str, *args: str) -> str:
    out = tmp_path / f"report_{experiment}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "report.py"), experiment,
         "--tracking-uri", train_run.tracking_uri, "--out", str(out), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"The report: {out / 'report.md'}" in proc.stdout
    return (out / "report.md").read_text()


def test_real_ablation_multirun_with_a_failing_job_and_its_report(train_run, tmp_path: Path):
    """2 arms x 2 seeds of `+ablation=lrn` at toy size, plus a job that fails at run time (seed -1 is out of
    numpy's range): the sweep finishes the other jobs, and the report counts and lists the failed one."""
    proc = train_run(
        "+ablation=lrn", "experiment=smoke", "logger.experiment_name=toy", "data.synthetic_size=64",
        "seed=1,2,-1", multirun=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0  # the failing job is reported at the end of the sweep...
    runs = train_run.runs("toy")
    by_arm = {(r.data.tags["ablation.factor"], r.data.tags["seed"]): r.info.status for r in runs}
    assert by_arm == {  # ...after every other job ran
        ("paper", "1"): "FINISHED", ("paper", "2"): "FINISHED", ("paper", "-1"): "FAILED",
        ("lrn", "1"): "FINISHED", ("lrn", "2"): "FINISHED", ("lrn", "-1"): "FAILED",
    }  # fmt: skip
    for r in runs:
        assert r.data.params["model.lrn"] == (
            "True" if r.data.tags["ablation.factor"] == "paper" else "False"
        )
    md = report_of(train_run, tmp_path, "toy")
    lrn_row = next(line for line in md.splitlines() if line.startswith("| Local response normalization"))
    assert "| 2 (+2 not finished) |" in lrn_row and "**inconclusive**" in lrn_row  # 2 seeds < 3
    assert "`python src/train.py -m +ablation=lrn experiment=smoke" in lrn_row  # the command that made it
    assert "-1 is not in bounds" in md  # the failed jobs and why
    assert md.count("| FAILED |") == 2
    # Claims without runs: the command that completes this report, at this scale, on this data, into this
    # experiment.
    assert "`python src/train.py -m +ablation=pooling experiment=smoke logger.experiment_name=toy " \
        "data.synthetic_size=64`" in md  # fmt: skip
    # The sweep's parent run in the UI: ended with its last job, with the sweep's counts, and one click from
    # the report that read its jobs.
    client = MlflowClient(train_run.tracking_uri)
    (parent,) = [r for r in train_run.runs("toy", parents=True) if "alexnet.sweep" in r.data.tags]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FAILED" and parent.info.end_time >= max(r.info.end_time for r in runs)
    counts = {k: v for k, v in parent.data.metrics.items() if k.startswith("sweep/")}
    assert counts == {"sweep/finished": 4, "sweep/failed": 2, "sweep/killed": 0, "sweep/running": 0}
    exp = client.get_experiment_by_name("toy").experiment_id
    (report,) = client.search_runs([exp], "tags.`alexnet.report` = 'true'")
    assert parent.data.tags["alexnet.report_run"] == report.info.run_id
    assert f"runs/{report.info.run_id}/artifacts/report.html" in parent.data.tags["mlflow.note.content"]


def test_a_factorial_multirun_reports_every_main_effect(train_run, tmp_path: Path):
    """The 16 runs of the 2^(7-3) design at the smoke scale, one seed: each of the seven switches has a main
    effect (beside the paper's delta for it), with no interval yet: an effect's noise comes from its own
    replicates, and the page says a second seed is needed."""
    train_run("+ablation=factorial", "experiment=smoke", "logger.experiment_name=design",
              "data.synthetic_size=64", "seed=1", multirun=True)  # fmt: skip
    runs = train_run.runs("design")
    assert len(runs) == 16 and all(r.info.status == "FINISHED" for r in runs)
    levels = {r.data.tags["ablation.level"] for r in runs}
    assert len(levels) == 16 and "+++++++" in levels
    everything_off = next(r for r in runs if r.data.tags["ablation.level"] == "-------").data.params
    switches = ("model.lrn", "model.activation", "model.columns")
    assert tuple(everything_off[k] for k in switches) == ("False", "tanh", "1")
    md = report_of(train_run, tmp_path, "design")
    verdicts = [line for line in md.splitlines() if "`python src/train.py" in line]  # not the noise table
    effects = [line for line in verdicts if "| main effect of " in line]
    factors = ("lrn_off", "pool_non_overlapping", "tanh", "dropout_off", "crops_flips_off", "pca_color_off",
               "one_column")  # fmt: skip
    assert len(effects) == 7 and all(any(f"main effect of {f} " in line for line in effects) for f in factors)
    lrn = next(line for line in effects if "lrn_off" in line)
    assert "| -1.4 |" in lrn and "+ablation=factorial experiment=smoke" in lrn
    assert not any("| interaction chain " in line for line in verdicts)
    assert "no interval" in lrn and "one replicate: an effect's interval comes from the spread" in md


FIGURE1_EPOCHS = {  # (activation, lr): {seed: epochs to 25%, or None: diverged}
    ("relu", "0.01"): {101: 4.0, 102: 4.4, 1: 4.1, 2: 3.9, 3: 4.0},
    ("relu", "0.03"): {101: 2.0, 102: None, 1: 2.1, 2: 2.0, 3: 1.9},
    ("tanh", "0.01"): {101: 20.0, 102: 22.0, 1: 21.0, 2: 19.0, 3: 20.0},
    ("tanh", "0.003"): {101: 30.0, 102: 31.0, 1: 30.0, 2: 29.0, 3: 33.0},
}


def log_figure1(client, exp, seeds, settings=FIGURE1_EPOCHS) -> None:
    """Figure 1's runs of ``seeds`` at each (activation, rate) of ``settings``, as its sweep logs them: the
    rate is the sweep's override, and min_lr follows it (the protocol holds the rate fixed)."""
    base = {**BASE, "model.arch": "figure1_cnn", "model.width": "1.0", "trainer.max_epochs": "40",
            "model.lrn": "False", "model.columns": "1", "model.dropout": "0.0"}  # fmt: skip
    for (activation, lr), by_seed in settings.items():
        params = {**base, "model.activation": activation, "optimizer.lr": lr, "optimizer.min_lr": lr}
        arm = "paper" if activation == "relu" else "tanh"
        for seed in seeds:
            e = by_seed[seed]
            tags = {"overrides": f"arm={arm} optimizer.lr={lr} seed={seed} +ablation=figure1 experiment=cpu"}
            if e == math.inf:  # stopped at the cap, short of the target
                log_run(client, exp, seed, params, tags=tags)
            elif e is None:
                log_run(client, exp, seed, params, status="FAILED",
                        tags={**tags, "diverged": "true", "error": "nan"})  # fmt: skip
            else:
                log_run(client, exp, seed, params, metrics={"final/epochs_to_target": e}, tags=tags)


@pytest.fixture
def figure1_store(tmp_path: Path):
    """Figure 1's runs: each arm at two learning rates; seeds 101 and 102 choose the rate, seeds 1-3 are
    reported. At ReLU's rate 0.03 one selection seed diverged (its survivor was fast); at tanh's rate 0.01
    seed 2 was run twice (resume=never), the newer run slower."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fig1", artifact_location=str(tmp_path / "artifacts"))
    log_figure1(client, exp, (101, 102, 1, 2, 3))
    log_figure1(client, exp, (2,), {("tanh", "0.01"): {2: 23.0}})
    return uri


def test_figure1_chooses_rates_on_held_out_seeds_counts_failures_as_censored_and_keeps_the_newest_run(
    figure1_store, tmp_path: Path
):
    rows, _ = make_report("fig1", figure1_store, tmp_path / "out", log_to_mlflow=False)
    (fig1,) = [r for r in rows if r.claim.name == "figure1"]
    # ReLU at 0.03 would win on its one surviving selection seed (2.0 epochs); counted as censored at 40
    # for the diverged one, 0.01 (4.2 on average) wins. tanh's 0.01 wins (21 against 30.5).
    assert any("paper: best optimizer.lr/optimizer.min_lr = 0.01," in n and "on the selection seeds" in n
               for n in fig1.notes)  # fmt: skip
    assert sorted(fig1.per_seed) == [1, 2, 3]  # the selection seeds are not reported
    assert fig1.per_seed[2] == pytest.approx(23.0 / 3.9)  # the newer of seed 2's two runs
    expected = math.exp(np.mean(np.log([21.0 / 4.1, 23.0 / 3.9, 20.0 / 4.0])))
    assert math.exp(fig1.estimate.mean) == pytest.approx(expected)
    assert fig1.verdict == "reproduced" and fig1.estimate.n == 3


def test_figure1_runs_in_two_stages_the_report_names_the_second(tmp_path: Path):
    """The sweep runs the selection seeds on the grid; the report then names each arm's reported seeds at
    its chosen rate alone, and says which are still to run until they have."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fig1", artifact_location=str(tmp_path / "artifacts"))

    def figure1_row():
        rows, _ = make_report("fig1", uri, tmp_path / "out", log_to_mlflow=False)
        return next(r for r in rows if r.claim.name == "figure1")

    # tanh is fastest at 0.003 here, ReLU at 0.01 (its 0.03 diverged at seed 102).
    epochs = {**FIGURE1_EPOCHS, ("tanh", "0.003"): {101: 15.0, 102: 16.0, 1: 15.0, 2: 14.0, 3: 16.0}}
    log_figure1(client, exp, (101,), epochs)  # one selection seed: the choice may still change
    assert not any("`python src/train.py" in n for n in figure1_row().notes)
    log_figure1(client, exp, (102,), epochs)
    row = figure1_row()
    assert row.estimate.n == 0 and row.verdict == "inconclusive"
    sweep = "python src/train.py -m +ablation=figure1"
    stage1 = f"{sweep} optimizer.lr=0.01,0.03,0.003 experiment=cpu seed=101,102"
    assert row.command == stage1
    second = {arm: f"{sweep} arm={arm} optimizer.lr={lr} optimizer.min_lr={lr} experiment=cpu seed=1,2,3"
              for arm, lr in (("paper", "0.01"), ("tanh", "0.003"))}  # fmt: skip
    for arm, then in second.items():
        assert (
            f"{arm}: the reported seeds at its chosen rate (still to run: seed 1, 2, 3): `{then}`"
            in row.notes
        )
    # Both chosen rates are the smallest each arm tried: the fastest may lie below. Each note names the
    # first stage one grid step further down (ReLU's step 3x, tanh's 3.33x).
    assert (f"paper: optimizer.lr=0.01 is the grid's smallest; try one step past it first: `{sweep} "
            "arm=paper optimizer.lr=0.0033 experiment=cpu seed=101,102`") in row.notes  # fmt: skip
    assert any(n.startswith("tanh: optimizer.lr=0.003 is the grid's smallest") and "optimizer.lr=0.0009 " in n
               for n in row.notes)  # fmt: skip
    # The second stage, as named: each arm at its rate only.
    log_figure1(client, exp, (1, 2, 3), {k: epochs[k] for k in (("relu", "0.01"), ("tanh", "0.003"))})
    row = figure1_row()
    assert row.per_seed == pytest.approx({1: 15.0 / 4.1, 2: 14.0 / 3.9, 3: 16.0 / 4.0})
    assert row.command == stage1  # the command column: the sweep, whose report names the rest
    for arm, then in second.items():
        assert f"{arm}: the reported seeds at its chosen rate: `{then}`" in row.notes
    # A slower rate below ReLU's: its chosen rate now lies inside the grid, and the edge note goes.
    log_figure1(client, exp, (101, 102), {("relu", "0.003"): {101: 8.0, 102: 9.0}})
    notes = figure1_row().notes
    assert not any(n.startswith("paper: optimizer.lr=") for n in notes)
    assert any(n.startswith("tanh: optimizer.lr=0.003 is the grid's smallest") for n in notes)
    # A chosen rate at which a selection seed stopped at the cap: the second stage would report a bound.
    log_figure1(client, exp, (101,), {("tanh", "0.003"): {101: math.inf}, ("tanh", "0.01"): {101: math.inf}})
    (capped,) = [n for n in figure1_row().notes if n.startswith("tanh: the reported seeds")]
    assert capped.startswith(f"tanh: the reported seeds at its chosen rate: `{second['tanh']}`; but ")
    assert "selection seed 101 never reached the target" in capped and "trainer.max_epochs" in capped


@pytest.mark.slow  # 14 real runs in three sweeps; the fast test above checks the same notes on logged runs
def test_figure1_in_two_real_stages_the_report_names_commands_that_run_one_rate_per_arm(
    train_run, tmp_path: Path
):
    """Figure 1's sweep at toy size (two rates, one epoch, a protocol from which every run is censored): its
    report names each arm's second stage, and those commands, run as printed, train the reported seeds at
    that arm's rate alone."""
    toy = (
        "experiment=smoke",
        "logger.experiment_name=fig1",
        "data.synthetic_size=64",
        "trainer.max_epochs=1",
    )
    train_run("+ablation=figure1", *toy, "optimizer.lr=0.01,0.03", multirun=True)
    assert len(train_run.runs("fig1")) == 8  # 2 arms x 2 rates x seeds 101, 102
    md = report_of(train_run, tmp_path, "fig1")
    named = re.findall(r"(paper|tanh): the reported seeds at its chosen rate \(still to run: seed 1, 2, 3\): "
                       r"`python src/train\.py -m ([^`]+)`", md)  # fmt: skip
    assert sorted(arm for arm, _ in named) == ["paper", "tanh"]
    for _, overrides in named:
        train_run(*overrides.split(), multirun=True)
    second = [r for r in train_run.runs("fig1") if r.data.tags.get("seed") in ("1", "2", "3")]
    rates = {arm: dict(re.findall(r"(optimizer\.lr)=(\S+)", o))["optimizer.lr"] for arm, o in named}
    assert sorted((r.data.tags["ablation.level"], r.data.tags["seed"]) for r in second) == sorted(
        (arm, seed) for arm in ("paper", "tanh") for seed in "123"
    )
    for r in second:
        assert r.data.params["optimizer.lr"] == rates[r.data.tags["ablation.level"]]
        assert r.data.params["optimizer.min_lr"] == r.data.params["optimizer.lr"]
    md = report_of(train_run, tmp_path, "fig1")
    assert "still to run" not in md
    row = next(line for line in md.splitlines() if line.startswith("| ReLU trains faster than tanh"))
    assert "| 3 |" in row and "**inconclusive**" in row  # ReLU censored at the cap: no verdict


def test_a_design_without_a_whole_replicate_says_how_far_it_has_got(tmp_path: Path):
    """Two points of the design and the paper arm's run at seed 1, only the paper arm's at seed 2: no
    effects yet, and the list of claims to run says seed 1 is 3 of 16 points along (seed 2 not begun)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("design", artifact_location=str(tmp_path / "artifacts"))
    design = next(c for c in load_claims() if c.name == "factorial").design()
    arms = [load_arm(name) for name in design.factors]
    for seed, point in ((1, 0), (1, 3), (1, 15), (2, 15)):  # 15: the paper's configuration
        params = dict(BASE)
        for arm, level in zip(arms, design.matrix[point], strict=True):
            params.update(dict(arm.values) if level < 0 else {})
        log_run(client, exp, seed, params, metrics={"test/top1_err_1crop": 0.3})
    rows, _ = make_report("design", uri, tmp_path / "out", log_to_mlflow=False)
    assert not [r for r in rows if r.claim.name == "factorial"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "max_epochs=6, schedule=- (config" in md and ", seed 1: 3 of 16 design points finished" in md
    assert "seed 2:" not in md


def test_factorial_effects_take_their_variance_from_their_own_replicates(tmp_path: Path):
    """The 16 runs of the 2^(7-3) design per seed, LRN off worth about 3 points at every seed and pooling
    worth +2 at some seeds and -2 at others (an effect that varies by seed). One replicate gives each main
    effect its value but no interval. With three, each effect's interval comes from its own three per-seed
    values (2 degrees of freedom): LRN's is narrow and decides, pooling's is wide and does not (a residual
    pooled over the effects would have given both the same width, too narrow for pooling's)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("design", artifact_location=str(tmp_path / "artifacts"))
    claim = next(c for c in load_claims() if c.name == "factorial")
    design = claim.design()
    arms = [load_arm(name) for name in design.factors]
    rng = np.random.default_rng(1)
    pooling_by_seed = {1: 0.02, 2: -0.02, 3: 0.02}

    def replicate(seed: int) -> np.ndarray:
        hard = errors_with(rng, 0.30)  # the images every point of this seed gets wrong
        rates = []
        for point in design.matrix:
            params = dict(BASE)
            for arm, level in zip(arms, point, strict=True):
                params.update(dict(arm.values) if level < 0 else {})
            extra = rng.uniform(0.01, 0.02) + (0.045 if params["model.lrn"] == "False" else 0.0)
            extra += pooling_by_seed[seed] * (params["model.pool"] == "non_overlapping") + 0.02
            errors = np.maximum(hard, rng.random(IMAGES) < extra)
            log_run(client, exp, seed, params, errors)
            rates.append(100 * errors.mean())
        return np.array(rates)

    def main_effects(out: str) -> dict[str, object]:
        rows, _ = make_report("design", uri, tmp_path / out, log_to_mlflow=False)
        top1 = [r for r in rows if r.claim.name == "factorial" and r.metric == "test/top1_err_1crop"]
        return {f: next(r for r in top1 if f"main effect of {f} " in r.label) for f in design.factors}

    rates = {1: replicate(1)}
    one = main_effects("one")
    levels = design.matrix[:, design.factors.index("lrn_off")]
    lrn = one["lrn_off"]
    assert lrn.estimate.mean == pytest.approx(rates[1][levels > 0].mean() - rates[1][levels < 0].mean())
    assert lrn.estimate.n == 1 and not lrn.estimate.ok and lrn.verdict == "inconclusive"
    assert any("one replicate" in note for note in lrn.notes)

    rates |= {2: replicate(2), 3: replicate(3)}
    log_run(client, exp, 4, BASE, errors_with(rng, 0.30))  # a one-switch sweep's paper run: not the design's
    three = main_effects("three")
    lrn, pool = three["lrn_off"], three["pool_non_overlapping"]
    per_seed = [rates[s][levels > 0].mean() - rates[s][levels < 0].mean() for s in (1, 2, 3)]
    assert lrn.per_seed == pytest.approx(dict(zip((1, 2, 3), per_seed, strict=True)))
    assert lrn.estimate.noise_df == 2 and lrn.estimate.n == 3
    assert lrn.estimate.run_part == pytest.approx(np.var(per_seed, ddof=1) / 3, rel=1e-9)
    assert lrn.verdict == "reproduced" and lrn.primary
    assert pool.estimate.half > 3 * lrn.estimate.half and pool.verdict == "inconclusive"
    rows, _ = make_report("design", uri, tmp_path / "chains", log_to_mlflow=False)
    chains = [r for r in rows if r.label.startswith("interaction chain ")]
    assert len(chains) == 7 and not any(r.primary for r in chains)  # secondary: a family of their own
    assert not any("only part of the design" in n for r in three.values() for n in r.notes)


def test_a_claim_against_overfitting_says_whether_the_runs_overfit(tmp_path: Path):
    """Dropout and augmentation are the paper's cures for overfitting (section 4): next to their rows the
    report puts the training error of the runs without them against their test error. Here the runs without
    dropout end no better on their training images than on the test set (nothing to cure: what the row
    measures is dropout's cost), and the runs without crops and flips overfit by about 20 points."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cures", artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(2)
    arms = {"paper": ({}, 0.31), "dropout_off": ({"model.dropout": "0.0"}, 0.32),
            "crops_flips_off": ({"data.crops": "False", "data.flips": "False"}, 0.12)}  # fmt: skip
    for seed in (1, 2, 3):
        for switches, train in arms.values():
            log_run(client, exp, seed, {**BASE, **switches}, errors_with(rng, 0.30),
                    metrics={"final/train_top1_err": train})  # fmt: skip
    rows, _ = make_report("cures", uri, tmp_path / "out", log_to_mlflow=False)
    (dropout,) = rows_of(rows, "dropout")
    (note,) = [n for n in dropout.notes if "training error" in n]
    assert "32.0% training error" in note and "they do not overfit" in note
    (crops,) = rows_of(rows, "crops_flips")
    (note,) = [n for n in crops.notes if "training error" in n]
    test = np.mean([100 * r.metrics["test/top1_err_1crop"] for r in crops.runs if r.params.get("data.crops")])
    assert "12.0% training error" in note and f"test error is {test - 12.0:.1f} points above" in note
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Dropout in fc6 and fc7: without it, the runs end at 32.0% training error" in md


def test_tables_at_one_scale_name_the_keys_their_configs_differ_in(tmp_path: Path):
    """Two schedules at one scale are two tables; their headings say which key sets them apart, not only
    their config digests."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("schedules", artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(3)
    for patience in ("2", "5"):
        for seed in (1, 2, 3):
            params = {**BASE, "optimizer.plateau_patience": patience}
            log_run(client, exp, seed, params, errors_with(rng, 0.30))
            log_run(client, exp, seed, {**params, "model.lrn": "False"}, errors_with(rng, 0.32))
    rows, _ = make_report("schedules", uri, tmp_path / "out", log_to_mlflow=False)
    headings = {r.section for r in rows_of(rows, "lrn")}
    assert len(headings) == 2
    for patience in ("2", "5"):
        (heading,) = [h for h in headings if f"optimizer.plateau_patience={patience} (config " in h]
        assert heading.startswith("arch=alexnet, dataset=cifar10, width=0.25")
        assert f"## Runs with {heading}" in (tmp_path / "out" / "report.md").read_text()


def test_take_off_says_when_each_arm_started_to_learn():
    """The first epoch with training error below 70%, per seed and arm, from the runs' histories; a note
    warns where the arms differ (part of the delta is then how fast each got going)."""
    from alexnet.report.analysis import take_off
    from alexnet.report.runs import new_record

    def run(curve):
        return new_record("id", "r", "FINISHED", 0, 1, {}, {}, {}, {"train/top1_err": curve})

    paper = {1: run([0.78, 0.61, 0.5]), 2: run([0.79, 0.6, 0.5])}
    same = {1: run([0.8, 0.65]), 2: run([0.8, 0.69])}
    late = {1: run([0.85, 0.8, 0.66]), 2: run([0.8, 0.69])}
    (note,) = take_off(paper, same, [1, 2])
    assert "seed 1: 2 and 2, seed 2: 2 and 2" in note and "differ" not in note
    (note,) = take_off(paper, late, [1, 2])
    assert "seed 1: 2 and 3" in note and "how fast each arm got going" in note
    assert take_off({1: run([])}, {1: run([])}, [1]) == []


def test_the_page_says_which_runs_each_commit_made():
    from alexnet.report.document import provenance
    from alexnet.report.runs import RunRecord

    hour = 3_600_000
    start = 1_795_000_000_000  # 2026-11-18 11:06 UTC
    made = [("a" * 40, 0), ("a" * 40, 1), ("b" * 40 + "-dirty", 2)]
    runs = [
        RunRecord(
            f"r{i}",
            f"r{i}",
            "FINISHED",
            1,
            start + i * hour,
            start + (i + 1) * hour,
            {},
            {},
            {"git_commit": c},
        )
        for c, i in made
    ]
    (bullets,) = provenance(runs, {})
    assert bullets.items[0].startswith("3 training runs (3 finished)") and "3.0 hours" in bullets.items[0]
    assert bullets.items[1:] == [
        "commit `aaaaaaaaaaaa`: 2 runs, 2026-11-18 11:06 to 2026-11-18 13:06 UTC",
        "commit `bbbbbbbbbbbb-dirty`: 1 runs, 2026-11-18 13:06 to 2026-11-18 14:06 UTC",
    ]
    (one,) = provenance(runs[:2], {})
    assert len(one.items) == 1  # one commit: the first line names it
