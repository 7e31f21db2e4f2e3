"""Every ablation sweep and every arm composes with every scale preset and passes the config check, and
each arm flips exactly the switches its claim is about."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from alexnet.config import ConfigError, check_config
from alexnet.report import load_arm, load_claims
from alexnet.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml"))
ARMS = sorted(p.stem for p in (ROOT / "conf" / "arm").glob("*.yaml"))
# Every sweep at the CPU scale; every scale with the sweep of all claims, and Figure 1 (a CIFAR-10 protocol)
# with the ImageNet scale, which must be refused.
CASES = [(sweep, "cpu") for sweep in SWEEPS] + [
    ("paper", "cifar10"),
    ("paper", "imagenet"),
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
    assert params.seed == "1,2,3"
    arms = params.arm.split(",")
    assert "paper" in arms and set(arms) <= set(ARMS)
    for arm in arms:
        job = compose_sweep(
            f"+ablation={sweep}",
            f"experiment={preset}",
            f"arm={arm}",
            f"paths.data_dir={tmp_path}",
            hydra=False,
        )
        if sweep == "figure1" and preset == "imagenet":  # a CIFAR-10 protocol: refused before training
            with pytest.raises(ConfigError, match="model.input_size=227"):
                check_config(job)
            continue
        check_config(job)
        assert job.logger.experiment_name == f"ablation_{preset}"
        expected = load_arm(arm)
        assert (job.ablation.factor, job.ablation.level) == (expected.factor, expected.level)


@pytest.mark.parametrize("arm", ARMS)
def test_an_arm_flips_only_its_own_switches(arm: str):
    paper = flatten(compose_sweep("experiment=cpu", "arm=paper", hydra=False))
    flipped = flatten(compose_sweep("experiment=cpu", f"arm={arm}", hydra=False))
    changed = {k for k in paper.keys() | flipped.keys() if paper.get(k) != flipped.get(k)}
    changed = {k for k in changed if not k.startswith(("ablation.", "hydra."))}
    assert changed == set(load_arm(arm).keys)


def test_every_claim_has_a_sweep_and_its_arm_is_swept():
    sweeps = {s: compose_sweep(f"+ablation={s}").hydra.sweeper.params.arm.split(",") for s in SWEEPS}
    everything = set(sweeps["paper"])
    for claim in load_claims():
        if claim.name == "figure1":
            assert claim.arm in sweeps["figure1"]
        elif claim.arm:
            assert claim.arm in everything, f"+ablation=paper does not run {claim.arm}"


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
