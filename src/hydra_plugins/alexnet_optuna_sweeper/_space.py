"""Hydra's sweep syntax as an Optuna search space.

- ``choice(a, b)``, ``a,b``, ``shuffle(range(...))``, ``glob(...)``  -> CategoricalDistribution
- ``range(start, stop, step)`` (Hydra's stop is exclusive)           -> IntDistribution, or FloatDistribution
                                                                         with ``step`` for float steps
- ``interval(low, high)``                                             -> FloatDistribution
- ``tag(log, interval(...))``, ``tag(log, range(...))``              -> the same on a log scale
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

log = logging.getLogger(__name__)


class SearchSpaceError(ValueError):
    """A search-space entry Optuna cannot sample. The message starts with the entry."""


@dataclass(frozen=True)
class SearchParam:
    name: str  # Optuna's parameter name: the config key, e.g. optimizer.lr
    key: str  # the override's key as written, with its +/++ prefix when it has one
    distribution: BaseDistribution

    def override(self, value: Any) -> str:
        return f"{self.key}={Transformer.str(value)}"


def to_distribution(override: Override, integer: bool = False) -> BaseDistribution:
    """One sweep override (``optimizer.lr=tag(log, interval(1e-4, 0.1))``) as an Optuna distribution.
    ``integer``: the key holds an integer (``trainer.max_epochs``), so an interval is sampled as integers,
    not as floats that the config check would refuse."""
    sweep = override.value()
    entry = override.input_line
    tags = set(getattr(sweep, "tags", set()))
    if tags - {"log"}:
        raise SearchSpaceError(
            f"{entry}: unknown tag {', '.join(sorted(tags - {'log'}))}; the sweeper reads one tag, "
            "'log' (sample on a log scale)."
        )
    log_scale = "log" in tags
    try:
        if override.is_interval_sweep():
            if integer:
                return IntDistribution(math.ceil(sweep.start), math.floor(sweep.end), log=log_scale)
            return FloatDistribution(sweep.start, sweep.end, log=log_scale)
        if override.is_range_sweep() and not sweep.shuffle:
            values = list(override.sweep_iterator())
            if not values:
                raise SearchSpaceError(f"{entry}: the range is empty (Hydra's range() excludes its stop).")
            low, high, step = min(values), max(values), abs(sweep.step)
            if all(isinstance(v, int) for v in values):
                return IntDistribution(low, high, step=step, log=log_scale)
            return FloatDistribution(low, high, step=step, log=log_scale)
        if log_scale:
            raise SearchSpaceError(f"{entry}: 'log' applies to interval() and range(), not to choices.")
        choices = list(override.sweep_iterator())
        for choice in choices:
            if not isinstance(choice, (str, int, float, bool)):
                raise SearchSpaceError(
                    f"{entry}: a choice must be a number, a string or a boolean, not {choice!r}."
                )
        return CategoricalDistribution(choices)
    except SearchSpaceError:
        raise
    except ValueError as err:  # Optuna's own checks: low > high, log scale from 0, log with a step, ...
        raise SearchSpaceError(f"{entry}: {err}") from None


def params_to_entries(params: Mapping[str, Any]) -> list[str]:
    """``hydra.sweeper.params`` as override strings. Sweep syntax is a string already; a plain YAML value
    (``0.0``, ``null``, ``[1, 2]``) is written back in override syntax."""
    return [f"{key}={v if isinstance(v, str) else Transformer.str(v)}" for key, v in params.items()]


def parse_search_space(
    entries: Sequence[str], parser: OverridesParser, integer: Callable[[str], bool] = lambda key: False
) -> tuple[list[SearchParam], list[str]]:
    """(the searched parameters, the overrides every trial gets unchanged). A later entry for the same key
    wins, so the command line (after hydra.sweeper.params) can fix a searched key or search a fixed one."""
    latest: dict[str, Override] = {}
    for override in parser.parse_overrides(list(entries)):
        name = override.get_key_element().lstrip("+~")
        earlier = latest.get(name)
        if earlier is not None and earlier.is_sweep_override() and not override.is_sweep_override():
            log.info("%s is fixed by %s: not searched", name, override.input_line)
        latest[name] = override
    space, fixed = [], []
    for name, override in latest.items():
        if override.is_sweep_override():
            space.append(
                SearchParam(name, override.get_key_element(), to_distribution(override, integer(name)))
            )
        else:
            fixed.append(override.input_line)
    return space, fixed
