"""Config composition and the up-front check: a wrong switch fails before any training, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from alexnet.config import ConfigError, check_config
from alexnet.model import Activation


def test_default_config_composes_and_checks(compose_cfg):
    cfg = compose_cfg()
    checked = check_config(cfg)
    assert checked.model.activation is Activation.relu
    assert checked.model.input_size == 32 and checked.data.image_size == 32
    assert checked.optimizer.lr == 0.01 and checked.optimizer.momentum == 0.9
    assert checked.optimizer.weight_decay == 5e-4 and checked.data.batch_size == 128


def test_paper_network_on_imagenet_composes(compose_cfg):
    checked = check_config(compose_cfg("data=imagenet", "model=alexnet"))
    assert checked.model.input_size == 227 and checked.model.num_classes == 1000
    assert checked.model.columns == 2 and checked.model.lrn and checked.model.dropout == 0.5


@pytest.mark.parametrize(
    "override,key,hint",
    [
        ("model.activation=foo", "model.activation", "relu, tanh, sigmoid"),
        ("model.dropout=1.5", "model.dropout", "[0, 1)"),
        ("model.columns=3", "model.columns", "1 (one-GPU net) or 2"),
        ("model.pool=huge", "model.pool", "non_overlapping"),
        ("model.lrn=maybe", "model.lrn", "not a valid bool"),
        ("model.removed_conv=conv2", "model.removed_conv", "conv3, conv4, conv5"),
        ("trainer.max_epochs=abc", "trainer.max_epochs", "int or null"),
        ("optimizer.schedule=milestones", "optimizer.milestones", "epochs to divide at"),
        ("+trainer.max_epoch=3", "trainer.max_epoch", "lightning.pytorch.Trainer"),  # a typo in a trainer key
        ("+model.colums=1", "model.colums", "columns"),  # a typo: unknown key, the allowed keys listed
        ("optimizer.lr=-1", "optimizer.lr", "positive"),
        ("data.batch_size=0", "data.batch_size", "positive"),
        ("model.input_size=227", "model.input_size", "32x32"),  # impossible with CIFAR-10 data
        ("data.resize_size=16", "data.resize_size", "crop size"),
        ("target_train_error=1.5", "target_train_error", "(0, 1)"),
    ],
)
def test_bad_switch_names_the_key(compose_cfg, override: str, key: str, hint: str):
    """A wrong type or value of an enum fails when Hydra composes the config (the schemas are typed); a
    range or a combination, in check_config. Either way the message names the key and what is allowed."""
    with pytest.raises((ConfigError, ConfigCompositionException)) as err:
        check_config(compose_cfg(override))
    message = str(err.value) + str(err.value.__cause__ or "")
    assert key in message and hint in message


# One of each path through train.py: a value the schema refuses (its check), a type Hydra refuses (composing);
# test_bad_switch_names_the_key checks every key's message in-process.
@pytest.mark.parametrize("override", ["model.activation=foo", "trainer.max_epochs=abc"])
def test_bad_switch_fails_before_a_run_is_created(train_run, override: str):
    proc = train_run(override, "data=synthetic", check=False, timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    key, value = override.split("=")
    assert key in output and value in output
    assert "Traceback" not in output  # one message for a person, not a stack
    assert train_run.runs() == []  # nothing started, nothing tracked


def test_every_switch_has_one_default_the_yaml_does_not_repeat():
    """Each switch's allowed values and default are written once, in the schema: the model and data YAML
    files set only what differs from it (the interpolations that tie the network to the data, CIFAR-10's
    root, ImageNet's sizes), never a switch at its default."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from alexnet.config import DataConfig
    from alexnet.model import ModelConfig

    root = Path(__file__).resolve().parents[1] / "conf"
    for group, schema in (("model", ModelConfig), ("data", DataConfig)):
        defaults = {f.name: getattr(schema(**({"root": "-"} if schema is DataConfig else {})), f.name)
                    for f in fields(schema)}  # fmt: skip
        for path in (root / group).glob("*.yaml"):
            for key, value in OmegaConf.to_container(OmegaConf.load(path)).items():
                if key != "defaults" and key in defaults:
                    default = getattr(defaults[key], "value", defaults[key])
                    assert value != default or key == "dataset", f"{path.name}: {key}={value} is the default"
