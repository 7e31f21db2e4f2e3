"""The Hydra sweeper plugin: ``python src/train.py -m hparams_search=<name>`` runs an Optuna study.

Hydra imports this module at every start-up to discover plugins, so it stays light: the work (and the
import of Optuna) is in ``_impl.py``, loaded when a sweep actually starts.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class AlexNetOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from ._impl import OptunaSweeperImpl

        self.impl = OptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.impl.sweep(arguments)
