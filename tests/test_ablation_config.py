"""Every ablation sweep and every arm composes with every scale preset and passes the config check, and
each arm flips exactly the switches its claim is about."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from alexnet import design
from alexnet.config import ConfigError, check_config
from alexnet.identity import flatten, run_key
from alexnet.report.claims import load_arm, load_claims

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml"))
ARMS = sorted(p.stem for p in (ROOT / "conf" / "arm").glob("*.yaml"))
# Every sweep at the CPU scale; every scale with the sweep of all claims, and Figure 1 (a CIFAR-10 protocol)
# with the ImageNet scale, which must be refused.
CASES = [(sweep, "cpu") for sweep in SWEEPS] + [
    ("paper", "cifar10"),
    ("paper", "imagenet"),
    ("figure1", "cpu_figure1"),
    ("figure1", "cifar10"),
    ("figure1", "imagenet"),
]


def compose_sweep(*overrides: str, hydra: bool = True):
    """The config of `python src/train.py -m overrides`: with the hydra node (the sweep's params), or as
    one of its jobs sees it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)
    if not hydra and "hydra" in cfg:  # a sweep file's hydra: node, which a running job does not see
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


@pytest.mark.parametrize(("sweep", "preset"), CASES)
def test_every_sweep_arm_composes_and_passes_the_check(sweep: str, preset: str, tmp_path: Path):
    cfg = compose_sweep(f"+ablation={sweep}", f"experiment={preset}", f"paths.data_dir={tmp_path}")
    params = cfg.hydra.sweeper.params
    if sweep == "factorial":  # its jobs are the runs of a design, not arms
        jobs = [f"design.run={run}" for run in range(design.design_of(cfg.design).runs)]
        assert params["design.run"] == f"range(0,{len(jobs)})"
    else:  # Figure 1's sweep is its first stage, the seeds that choose the rates (conf/claims.yaml)
        assert set(params.seed.split(",")) >= ({"101", "102"} if sweep == "figure1" else {"1", "2", "3"})
        arms = ARMS if params.arm == "glob(*)" else params.arm.split(",")
        assert "paper" in arms and set(arms) <= set(ARMS)
        jobs = [f"arm={arm}" for arm in arms]
    for arm_or_run in jobs:
        job = compose_sweep(
            f"+ablation={sweep}",
            f"experiment={preset}",
            arm_or_run,
            f"paths.data_dir={tmp_path}",
            hydra=False,
        )
        job = design.apply_run(job)
        if sweep == "figure1" and preset == "imagenet":  # a CIFAR-10 protocol: refused before training
            with pytest.raises(ConfigError, match="model.input_size=227"):
                check_config(job)
            continue
        check_config(job)
        assert job.logger.experiment_name == f"ablation_{preset.removesuffix('_figure1')}"
        if sweep != "factorial":
            expected = load_arm(arm_or_run.split("=")[1])
            assert (job.ablation.factor, job.ablation.level) == (expected.factor, expected.level)


@pytest.mark.parametrize("arm", ARMS)
def test_an_arm_flips_only_its_own_switches(arm: str):
    paper = flatten(compose_sweep("experiment=cpu", "arm=paper", hydra=False))
    flipped = flatten(compose_sweep("experiment=cpu", f"arm={arm}", hydra=False))
    changed = {k for k in paper.keys() | flipped.keys() if paper.get(k) != flipped.get(k)}
    changed = {k for k in changed if not k.startswith(("ablation.", "hydra."))}
    assert changed == set(load_arm(arm).keys)


def test_every_arm_of_a_claim_is_swept_by_the_paper_sweep():
    assert compose_sweep("+ablation=paper").hydra.sweeper.params.arm == "glob(*)"  # every arm, new ones too
    figure1 = compose_sweep("+ablation=figure1").hydra.sweeper.params
    for claim in load_claims():
        if claim.name == "figure1":
            assert claim.arm in figure1.arm.split(",")
            assert set(claim.selection_seeds) == {int(s) for s in figure1.seed.split(",")}
            assert not set(claim.selection_seeds) & set(claim.reported_seeds)
        for arm in claim.arms:
            assert arm in ARMS


def test_the_factorial_design_is_resolution_iv_over_the_binary_switches():
    """16 runs, every factor an arm, run 15 the paper's config, the 7 interaction chains of three."""
    cfg = compose_sweep("+ablation=factorial", "experiment=cpu")
    d = design.design_of(cfg.design)
    assert (d.runs, d.resolution, len(d.interaction_chains)) == (16, 4, 7)
    assert all(len(chain) == 3 for chain in d.interaction_chains)
    assert d.signs(15) == "+" * 7 and d.signs(0) == "-" * 7
    paper_cfg = compose_sweep("experiment=cpu", "arm=paper", hydra=False)
    job_cfg = design.apply_run(
        compose_sweep("+ablation=factorial", "experiment=cpu", "design.run=15", hydra=False)
    )
    paper, job = flatten(paper_cfg), flatten(job_cfg)
    same = {k: v for k, v in job.items() if not k.startswith(("ablation.", "design.", "hydra."))}
    assert same == {k: v for k, v in paper.items() if not k.startswith(("ablation.", "hydra."))}
    # so the design's all-paper point is the paper arm's run: a seed the claims have run trains 15 points
    assert run_key(job_cfg, "data") == run_key(paper_cfg, "data")
    with pytest.raises(ConfigError, match="design.run"):
        design.apply_run(compose_sweep("+ablation=factorial", "experiment=cpu", "design.run=16", hydra=False))


def test_figure1_cpu_scale_keeps_an_epochs_steps_on_a_quarter_of_the_images(tmp_path: Path):
    """experiment=cpu_figure1 is experiment=cpu_p10 (a fixed rate: no annealing) with fewer images in smaller
    batches, and nothing else: an epoch (what Figure 1 counts) is about as many SGD steps, on under a quarter
    of the images."""
    cpu, small = (
        flatten(compose_sweep("+ablation=figure1", f"experiment={preset}", f"paths.data_dir={tmp_path}",
                              "arm=tanh", hydra=False))
        for preset in ("cpu_p10", "cpu_figure1")
    )  # fmt: skip
    assert {k for k in cpu.keys() | small.keys() if cpu.get(k) != small.get(k)} == {
        "data.train_size", "data.batch_size"
    }  # fmt: skip
    images = 50_000 - int(cpu["data.val_size"])  # CIFAR-10's training images less the held-out ones
    assert cpu["data.train_size"] in ("None", "all") and int(small["data.train_size"]) <= images / 4
    steps = [
        math.ceil(n / int(c["data.batch_size"]))
        for n, c in ((images, cpu), (int(small["data.train_size"]), small))
    ]
    assert 0.85 <= steps[1] / steps[0] <= 1.0


def test_figure1_protocol_has_no_regularization_and_stops_at_the_target(tmp_path: Path):
    cfg = compose_sweep("+ablation=figure1", "experiment=cpu", f"paths.data_dir={tmp_path}")
    checked = check_config(
        compose_sweep("+ablation=figure1", "experiment=cpu", f"paths.data_dir={tmp_path}", hydra=False)
    )
    assert checked.model.arch.value == "figure1_cnn" and checked.model.dropout == 0.0
    assert checked.optimizer.weight_decay == 0.0
    assert not (checked.data.crops or checked.data.flips or checked.data.pca_color)
    assert cfg.stop_at_target and cfg.target_train_error == 0.25
    assert len(cfg.hydra.sweeper.params["optimizer.lr"].split(",")) >= 2
