"""Config composition and the up-front check: a wrong switch fails before any training, naming the key."""

from __future__ import annotations

import pytest

from alexnet.config import Activation, ConfigError, check_config


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
        ("model.activation=foo", "model.activation", "relu"),
        ("model.dropout=1.5", "model.dropout", "[0, 1)"),
        ("model.columns=3", "model.columns", "1 (one-GPU net) or 2"),
        ("model.pool=huge", "model.pool", "non_overlapping"),
        ("model.lrn=maybe", "model.lrn", "not a valid bool"),
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
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(override))
    assert key in str(err.value)
    assert hint in str(err.value)


def test_bad_switch_fails_before_training(train_run):
    proc = train_run("model.activation=foo", "data=synthetic", check=False, timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "model.activation" in output and "foo" in output
    assert "Traceback" not in output  # one message for a person, not a stack
    assert train_run.runs() == []  # nothing started, nothing tracked
