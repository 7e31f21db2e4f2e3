"""Results bundles (alexnet.report.bundle): a store exported into the repository and read back gives the same
runs and the same report; a page made from bundles alone is made again byte for byte; bundles and a store
merge; a run whose outcomes cannot be read is named; the report's user mistakes are one line each."""

from __future__ import annotations

import importlib.util
import io
import json
import shlex
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from test_report import BASE, IMAGES, LABELS, errors_with, outcomes

from alexnet.errors import ReportError
from alexnet.report import bundle
from alexnet.report.analysis import analyse
from alexnet.report.claims import load_claims
from alexnet.report.cli import README_END, README_START, ROOT, main, make_report
from alexnet.report.rows import Settings
from alexnet.report.runs import HISTORY, fetch_runs, load_outcomes
from alexnet.tracking import OUTCOMES_ARTIFACT, git_commit, labels_digest

SECRET = "s3cr3t-pw"
CURVE = (0.8, 0.65, 0.5, 0.35, 0.2)  # Figure 1's runs' training error, epoch by epoch
ROW_FIELDS = {"claim", "title", "label", "section", "metric", "primary", "unit", "paper", "mean", "lo", "hi",
              "n", "verdict", "verdict_adjusted", "mde", "seeds_for_80", "seeds_for_80_holm"}  # fmt: skip


def export_cli(*args: str) -> int:
    """``python src/export.py args``, in this process."""
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "src" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def log_fast(client, exp, seed, params, errors=None, status="FINISHED", tags=None, metrics=None, curve=()):
    """test_report.log_run's run in one batch (a quarter of its time): params, metrics, tags, the per-epoch
    errors ``curve`` (logged last epoch first: a history is ordered by step) and, given ``errors``, the
    per-image outcomes artifact as train.py writes it."""
    run_id = client.create_run(exp, tags={"seed": str(seed), **(tags or {})}).info.run_id
    metrics = dict(metrics or {})
    if errors is not None:
        metrics |= {"test/top1_err_1crop": float(errors.mean()), "test/top1_err_10crop": float(errors.mean()),
                    "test/top5_err_1crop": 0.0, "test/top5_err_10crop": 0.0}  # fmt: skip
        buffer = io.BytesIO()
        packed = {k: np.packbits(v) for k, v in outcomes(errors).items()}
        np.savez_compressed(buffer, images=np.int64(IMAGES), labels_sha=labels_digest(LABELS), **packed)
        path = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / OUTCOMES_ARTIFACT
        path.parent.mkdir(parents=True)
        path.write_bytes(buffer.getvalue())
    now = int(time.time() * 1000)
    history = [Metric(key, err, now, 100 * (epoch + 1)) for epoch, err in reversed(list(enumerate(curve)))
               for key in HISTORY]  # fmt: skip
    client.log_batch(
        run_id, [*(Metric(k, v, now, 0) for k, v in metrics.items()), *history],
        [Param(k, v) for k, v in {**params, "seed": str(seed)}.items()],
    )  # fmt: skip
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """LRN at 3 seeds with per-image outcomes, the columns claim from before outcomes were kept, a failed
    run, and Figure 1's runs (one selection seed, two reported) with per-epoch training errors. Tests read
    it and never change it (one that does puts it back)."""
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bundled", artifact_location=str(tmp / "artifacts"))
    rng = np.random.default_rng(5)
    secret = {"overrides": f"experiment=cpu logger.tracking_uri=http://me:{SECRET}@host:5000"}
    for seed in (1, 2, 3):
        paper = errors_with(rng, 0.30)
        log_fast(client, exp, seed, BASE, paper, tags=secret)
        log_fast(
            client, exp, seed, {**BASE, "model.lrn": "False"}, np.maximum(paper, rng.random(IMAGES) < 0.04)
        )
    old = {**BASE, "trainer.max_epochs": "5"}
    for seed in (1, 2):
        log_fast(client, exp, seed, old, metrics={"test/top1_err_1crop": 0.30 + seed / 100})
        log_fast(client, exp, seed, {**old, "model.columns": "1"}, metrics={"test/top1_err_1crop": 0.33})
    log_fast(client, exp, 4, BASE, status="FAILED", tags={"error": "RuntimeError: out of memory"})
    figure1 = {**BASE, "model.arch": "figure1_cnn", "model.width": "1.0", "trainer.max_epochs": "40",
               "model.lrn": "False", "model.columns": "1", "model.dropout": "0.0"}  # fmt: skip
    for activation, epochs in (("relu", {101: 4.0, 1: 4.1, 2: 3.9}), ("tanh", {101: 20.0, 1: 21.0, 2: 19.0})):
        params = {
            **figure1,
            "model.activation": activation,
            "optimizer.lr": "0.01",
            "optimizer.min_lr": "0.01",
        }
        for seed, e in epochs.items():
            log_fast(client, exp, seed, params, metrics={"final/epochs_to_target": e}, curve=CURVE)
    return uri, client


def test_a_bundle_holds_what_the_store_holds_and_exports_the_same_bytes_again(store, tmp_path: Path, capsys):
    uri, client = store
    out = tmp_path / "results" / "bundled"
    assert export_cli("bundled", "--tracking-uri", uri, "--out", str(out)) == 0
    assert "17 runs exported (0 replaced)" in capsys.readouterr().out
    runs = fetch_runs(client, client.get_experiment_by_name("bundled").experiment_id)
    load_outcomes(client, runs)
    loaded = {r.run_id: r for r in bundle.load(out)}
    assert [r.run_id for r in runs] == list(loaded) and len(runs) == 17
    for run in runs:
        back = loaded[run.run_id]
        assert (back.name, back.status, back.seed, back.start, back.end, back.arm) == (
            run.name, run.status, run.seed, run.start, run.end, run.arm)  # fmt: skip
        assert back.params == run.params and back.metrics == run.metrics and back.history == run.history
        tags = {k: v.replace(SECRET, "***") for k, v in run.tags.items() if not k.startswith("mlflow.")}
        assert back.tags == tags
        assert (back.outcomes is None) == (run.outcomes is None) and back.labels_sha == run.labels_sha
        for view, outcome in (run.outcomes or {}).items():
            assert np.array_equal(back.outcomes[view], outcome)
    assert next(r for r in runs if r.arch == "figure1_cnn").history["train/top1_err"] == list(CURVE)
    assert sum(r.outcomes is not None for r in runs) == 6
    assert SECRET not in "".join(p.read_bytes().decode("latin-1") for p in out.iterdir())
    header = json.loads((out / "bundle.json").read_text())
    (export,) = header["exports"]
    assert header["experiment"] == "bundled" and header["runs"] == 17 and export["store"] == uri
    assert export["commit"] == git_commit(ROOT) and export["machine"] and export["at"].endswith("Z")
    assert sum(p.stat().st_size for p in out.iterdir()) < 17 * 20_000
    # Exported again: the runs replaced, not added, and the same bytes (only the header records the export).
    before = {name: (out / name).read_bytes() for name in ("runs.json", "outcomes.npz")}
    assert export_cli("bundled", "--tracking-uri", uri, "--out", str(out), "--page", "docs/x.md") == 0
    assert "17 runs exported (17 replaced) into" in capsys.readouterr().out
    assert before == {name: (out / name).read_bytes() for name in before}
    header = json.loads((out / "bundle.json").read_text())
    assert len(header["exports"]) == 2 and header["page"] == "docs/x.md"
    assert export_cli("nope", "--tracking-uri", uri, "--out", str(tmp_path / "nope")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No experiment 'nope'" in err


def test_the_report_from_a_bundle_equals_the_report_from_its_store(store, tmp_path: Path):
    uri, client = store
    bundle.export(client, "bundled", tmp_path / "b")
    from_store, runs = make_report("bundled", uri, tmp_path / "s", log_to_mlflow=False)
    from_bundle, loaded = make_report("bundled", None, tmp_path / "o", bundles=[tmp_path / "b"])
    assert [r.run_id for r in runs] == [r.run_id for r in loaded]
    assert bundle.page_json(from_bundle) == bundle.page_json(from_store)
    assert [(r.key, r.notes, r.per_seed, r.estimate.method) for r in from_bundle] == [
        (r.key, r.notes, r.per_seed, r.estimate.method) for r in from_store]  # fmt: skip
    assert {r.claim.name for r in from_bundle} >= {"lrn", "columns", "figure1"}
    # Figure 1's curves come from the runs' histories, the same from either
    _, curves = analyse(load_claims(), loaded, Settings())
    assert len(curves) == 1
    (relu, tanh) = curves[0].curves.values()
    assert relu == tanh == [[(0, 0.9), *enumerate(CURVE, 1)]] * 2  # seeds 1 and 2, as the store logged them
    assert not client.search_runs([client.get_experiment_by_name("bundled").experiment_id],
                                  "tags.`alexnet.report` = 'true'")  # fmt: skip


def test_a_page_from_a_bundle_is_made_again_byte_for_byte(store, tmp_path: Path, capsys):
    """Nothing of the machine or the moment that makes the page: its header comes from the bundle's."""
    _, client = store
    out = tmp_path / "results" / "bundled"
    bundle.export(client, "bundled", out)
    header = json.loads((out / "bundle.json").read_text())
    header["exports"][0] |= {
        "at": "2020-01-02T03:04:05Z",
        "commit": "0123456789abcdef",
        "machine": "a lab box",
    }
    (out / "bundle.json").write_text(json.dumps(header))
    pages = []
    for attempt in ("one", "two"):
        page = tmp_path / attempt / "results.md"
        page.parent.mkdir()
        args = [
            "bundled",
            "--from",
            str(out),
            "--page",
            str(page),
            "--no-log",
            "--out",
            str(tmp_path / attempt),
        ]
        assert main(args) == 0
        pages.append((page.read_bytes(), page.with_suffix(".json").read_bytes()))
    assert pages[0] == pages[1]
    text = pages[0][0].decode()
    made = (
        f"`python src/report.py bundled --from {out.as_posix()}`, from the bundle {out.as_posix()} "
        "(17 runs of experiment bundled)"
    )
    assert f"{made}, exported 2020-01-02 03:04 UTC at commit `0123456789ab` from sqlite:///" in text
    assert "- machine: a lab box (where the bundle was exported)" in text
    made_by = "\n".join(line for line in text.splitlines() if line.startswith(("- report:", "- machine:")))
    assert git_commit(ROOT)[:12] not in made_by and time.strftime("%Y-%m-%d") not in made_by
    rows = json.loads(pages[0][1])
    assert rows and all(set(row) == ROW_FIELDS for row in rows)
    (lrn,) = [r for r in rows if r["claim"] == "lrn" and r["primary"] and "max_epochs=6" in r["section"]]
    assert lrn["paper"] == -1.4 and lrn["n"] == 3 and lrn["lo"] < lrn["mean"] < lrn["hi"] < 0
    assert lrn["verdict"] in ("reproduced", "inconclusive") and lrn["metric"] == "test/top1_err_1crop"
    (fig1,) = [r for r in rows if r["claim"] == "figure1"]
    assert fig1["unit"] == "x" and fig1["mean"] == pytest.approx((21.0 / 4.1 * 19.0 / 3.9) ** 0.5, abs=1e-4)
    assert fig1["lo"] is None or fig1["lo"] > 0  # a ratio, as on the page, not its log


def test_bundles_and_a_store_merge_into_one_page(store, tmp_path: Path, capsys):
    uri, client = store
    on, off = tmp_path / "on", tmp_path / "off"
    for folder, arch in ((on, "alexnet"), (off, "figure1_cnn")):
        query = f"params.`model.arch` = '{arch}'"
        assert export_cli("bundled", "--tracking-uri", uri, "--out", str(folder), "--filter", query) == 0
    assert [len(bundle.load(on)), len(bundle.load(off))] == [11, 6]
    capsys.readouterr()
    pages = {}
    both = {"bundles": ["--from", str(on), "--from", str(off)],
            "bundle and store": ["--from", str(off), "--tracking-uri", uri]}  # fmt: skip
    for name, sources in both.items():
        pages[name] = tmp_path / name / "page.md"
        pages[name].parent.mkdir()
        assert (
            main(["bundled", *sources, "--page", str(pages[name]), "--no-log", "--out", str(tmp_path / name)])
            == 0
        )
        assert "17 runs read" in capsys.readouterr().out  # every run once
    # the same rows (a bundle's report equals its store's: test_the_report_from_a_bundle_equals_...)
    twins = {name: page.with_suffix(".json").read_text() for name, page in pages.items()}
    assert twins["bundles"] == twins["bundle and store"] and '"figure1"' in twins["bundles"]
    made = pages["bundles"].read_text()
    assert (
        f"--from {on.as_posix()} --from {off.as_posix()}`, from the bundle {on.as_posix()} "
        "(11 runs of experiment bundled)" in made
    )
    made = pages["bundle and store"].read_text()
    assert f"--from {off.as_posix()} --tracking-uri {uri}` at commit" in made and f"; {uri}\n" in made
    # a filter selects a bundle's runs as MLflow selects the store's
    exp = client.get_experiment_by_name("bundled").experiment_id
    for query in ("tags.seed = '1'", "params.`model.lrn` = 'False' and metrics.`test/top1_err_1crop` > 0.3",
                  "attributes.status = 'FAILED'"):  # fmt: skip
        selected = bundle.select([*bundle.load(on), *bundle.load(off)], query)
        assert sorted(r.run_id for r in selected) == sorted(
            r.info.run_id for r in client.search_runs([exp], query)
        )
        assert selected, query


def test_a_run_whose_outcomes_cannot_be_read_is_named_unless_seeds_only_is_allowed(
    store, tmp_path: Path, request
):
    uri, client = store
    exp = client.get_experiment_by_name("bundled").experiment_id
    (broken,) = client.search_runs(
        [exp], "tags.seed = '2' and params.`model.lrn` = 'False' and params.`model.arch` = 'alexnet'"
    )
    path = Path(broken.info.artifact_uri.removeprefix("file://")) / OUTCOMES_ARTIFACT
    kept = path.read_bytes()
    path.write_bytes(b"not an npz file")
    request.addfinalizer(lambda: path.write_bytes(kept))  # the store is the module's
    name, run_id = broken.info.run_name, broken.info.run_id
    with pytest.raises(ReportError, match=rf"Run {name} \({run_id}\) finished but .* --allow-seeds-only"):
        make_report("bundled", uri, tmp_path / "o", log_to_mlflow=False)
    rows, _ = make_report("bundled", uri, tmp_path / "o", log_to_mlflow=False, allow_seeds_only=True)
    (lrn,) = [r for r in rows if r.claim.name == "lrn" and r.primary and "max_epochs=6" in r.section]
    assert lrn.estimate.method == "seeds only" and any(run_id in n for n in lrn.notes)
    assert any("seeds' noise only" in n for n in lrn.notes)
    # exported, the run is kept without outcomes, and the same rule applies to the bundle
    done = bundle.export(client, "bundled", tmp_path / "b")
    assert [r.run_id for r in done["unreadable"]] == [run_id]
    with pytest.raises(ReportError, match=rf"Run {name} \({run_id}\)"):
        make_report("bundled", None, tmp_path / "o", bundles=[tmp_path / "b"])
    rows, _ = make_report("bundled", None, tmp_path / "o", bundles=[tmp_path / "b"], allow_seeds_only=True)
    assert any(run_id in n for r in rows if r.claim.name == "lrn" for n in r.notes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_report_mistakes_are_one_line_and_exit_2_before_any_report_run(store, tmp_path: Path, capsys):
    uri, client = store
    bad_yaml, no_kind = tmp_path / "bad.yaml", tmp_path / "no_kind.yaml"
    bad_yaml.write_text("claims: {lrn: [unclosed\n")
    no_kind.write_text("primary: test/top1_err_1crop\nclaims:\n  lrn:\n    title: LRN\n")
    base = ["bundled", "--tracking-uri", uri, "--out", str(tmp_path / "o")]
    mistakes = {
        "unreachable": (["bundled", "--tracking-uri", f"http://me:{SECRET}@127.0.0.1:{free_port()}"],
                        "Cannot reach the MLflow tracking server"),
        "filter": ([*base, "--filter", "params.x = "], "--filter: Invalid clause"),
        "claims missing": ([*base, "--claims", str(tmp_path / "none.yaml")], "no such file"),
        "claims syntax": ([*base, "--claims", str(bad_yaml)], "is not a claims file"),
        "claims keys": ([*base, "--claims", str(no_kind)], "is not a claims file"),
        "one seed": ([*base, "--min-seeds", "1"], "'1' is not a whole number of seeds of at least 2"),
        "seeds not a number": ([*base, "--min-seeds", "two"], "'two' is not a whole number"),
        "zero margin": ([*base, "--margin", "0"], "'0' is not a number of points above 0"),
        "negative margin": ([*base, "--margin", "-1"], "'-1' is not a number"),
        "no bundle": (["bundled", "--from", str(tmp_path / "none")], "is not a results bundle"),
    }  # fmt: skip
    for what, (args, says) in mistakes.items():
        began = time.monotonic()
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and says in err, (what, err)
        assert SECRET not in err and "Traceback" not in err and time.monotonic() - began < 10, what
    exp = client.get_experiment_by_name("bundled").experiment_id
    assert not client.search_runs([exp], "tags.`alexnet.report` = 'true'")


def test_the_results_page_is_made_again_from_the_committed_bundle(tmp_path: Path, monkeypatch, capsys):
    """Each committed bundle that names its page (python src/export.py --page) makes that page again, byte for
    byte, with the command the page shows, and its .json twin."""
    named = [(p.parent, json.loads(p.read_text())["page"]) for p in sorted(ROOT.glob("results/*/bundle.json"))
             if "page" in json.loads(p.read_text())]  # fmt: skip
    if not named:
        pytest.skip(
            "no bundle in results/ names a page yet (python src/export.py ... --page docs/results.md)"
        )
    monkeypatch.chdir(ROOT)
    for folder, page in named:
        committed = ROOT / page
        line = next(
            li for li in committed.read_text().splitlines() if li.startswith("- report: `python src/")
        )
        command = shlex.split(line.split("`")[1])
        assert command[:2] == ["python", "src/report.py"] and "--tracking-uri" not in command, line
        assert f"--from {folder.relative_to(ROOT).as_posix()}" in line
        made = tmp_path / folder.name / committed.name
        made.parent.mkdir()
        readme = made.parent / "README.md"  # the README's table of primary rows, made again beside it
        readme.write_text(README_START + "\n| stale |\n" + README_END + "\n")
        args = ["--page", str(made), "--readme", str(readme), "--no-log", "--out", str(made.parent / "out")]
        assert main([*command[2:], *args]) == 0
        assert made.read_bytes() == committed.read_bytes(), f"{page} is not what {folder} makes"
        assert made.with_suffix(".json").read_bytes() == committed.with_suffix(".json").read_bytes()
        if page == "docs/results.md":
            assert readme.read_text() in (ROOT / "README.md").read_text(), "README's table is not the page's"


def test_a_readme_without_the_table_markers_is_one_line_before_anything_is_read(tmp_path: Path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# My fork\n")
    store = f"sqlite:///{tmp_path / 'absent.db'}"
    assert main(["ablation_cpu", "--tracking-uri", store, "--readme", str(readme), "--no-log"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert README_START in line and README_END in line and str(readme) in line
    assert not (tmp_path / "absent.db").exists()  # nothing was opened
    assert readme.read_text() == "# My fork\n"
