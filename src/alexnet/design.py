"""Two-level fractional factorial designs over arms: ``python src/train.py -m +ablation=factorial``.

Each factor is an arm of ``conf/arm/`` (a switch of the paper's net and its other level); a run of the
design sets every factor to the paper's level (+) or the arm's (-). The default design,
``conf/ablation/factorial.yaml``, puts the 2012 net's seven binary switches in a 2^(7-3) design of
resolution IV (generators E = ABC, F = BCD, G = ACD: the 16-run 7-factor design of Box, Hunter & Hunter,
"Statistics for Experimenters", 2nd ed., table 6.14): no main effect is aliased with another main effect or
with a two-factor interaction, and the 21 two-factor interactions fall into 7 alias chains of three.
pyDOE builds the design matrix from the generators and its alias groups (`fracfact_aliasing`); this module
reads off the resolution and the two-factor alias chains.

Why a factorial: a main effect is the mean of the 8 runs at one level minus the mean of the 8 at the
other, so from N runs it has variance 4 sigma^2 / N, where a one-switch-at-a-time delta from the same N runs
(N / 8 seeds for each of 8 arms) has 16 sigma^2 / N: a quarter. The price: a main effect is averaged over
the other switches' levels, where a one-switch sweep compares against the paper's exact configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from pydoe import fracfact, fracfact_aliasing

from alexnet.errors import ConfigError, require

ARMS_DIR = Path(__file__).resolve().parents[2] / "conf" / "arm"


@dataclass(frozen=True)
class Design:
    """``factors``: arm names; ``generators``: pyDOE's notation, one word per factor ("a b c abc")."""

    factors: tuple[str, ...]
    generators: str

    def __post_init__(self) -> None:
        words = self.generators.split()
        require(
            len(words) == len(self.factors) >= 2,
            "design.generators",
            self.generators,
            f"one generator word per factor ({len(self.factors)} factors: {', '.join(self.factors)})",
        )
        for name in self.factors:
            require((ARMS_DIR / f"{name}.yaml").is_file(), "design.factors", name, f"an arm of {ARMS_DIR}")

    @cached_property
    def matrix(self) -> np.ndarray:
        """(runs, factors) of +1 (the paper's level) and -1 (the arm's level)."""
        return fracfact(self.generators).astype(int)

    @property
    def runs(self) -> int:
        return len(self.matrix)

    def signs(self, run: int) -> str:
        """Run ``run``'s levels as a string, e.g. ``+-+----``: the run's ``ablation.level`` tag."""
        return "".join("+" if v > 0 else "-" for v in self.matrix[run])

    @cached_property
    def aliases(self) -> list[tuple[tuple[int, ...], ...]]:
        """pyDOE's alias groups (``fracfact_aliasing``): the effects that share one column of the design,
        each effect as its factors' indices, shortest first."""
        groups, _ = fracfact_aliasing(self.matrix)
        return [tuple(sorted((tuple(ord(c) - ord("a") for c in w) for w in g.split(" = ")), key=len))
                for g in groups]  # fmt: skip

    @cached_property
    def defining_relation(self) -> tuple[tuple[int, ...], ...]:
        """The words whose product column is constant (the identity's alias group); none: a full factorial."""
        constant = [
            g for g in self.aliases if abs(self.matrix[:, list(g[0])].prod(axis=1).sum()) == self.runs
        ]
        return constant[0] if constant else ()

    @property
    def resolution(self) -> int:
        """The length of the shortest word of the defining relation."""
        return len(self.defining_relation[0]) if self.defining_relation else len(self.factors) + 1

    @property
    def interaction_chains(self) -> list[tuple[tuple[int, int], ...]]:
        """The two-factor interactions that share a column (each group one estimable contrast, the sum of its
        members), where no main effect shares it."""
        return [tuple(w for w in g if len(w) == 2) for g in self.aliases
                if len(g[0]) == 2 and g != self.defining_relation]  # fmt: skip

    def chain_name(self, chain: tuple[tuple[int, int], ...]) -> str:
        return " = ".join(f"{self.factors[i]} x {self.factors[j]}" for i, j in chain)


def design_of(node: DictConfig | dict) -> Design:
    return Design(tuple(node["factors"]), str(node["generators"]))


def apply_run(cfg: DictConfig) -> DictConfig:
    """A factorial job's config: for run ``design.run``, every factor at the arm's level merged in (its
    switches only), and the run tagged ``ablation.factor=factorial``, ``ablation.level=<signs>``. Other
    configs are returned as they are."""
    node = cfg.get("design")
    if not node or node.get("run") is None:
        return cfg
    design = design_of(node)
    run = node.run
    require(
        isinstance(run, int) and 0 <= run < design.runs,
        "design.run",
        run,
        f"a run of the design: 0..{design.runs - 1}",
    )
    for name, level in zip(design.factors, design.matrix[run], strict=True):
        if level < 0:
            arm = OmegaConf.load(ARMS_DIR / f"{name}.yaml")
            arm.pop("ablation", None)
            try:
                cfg = OmegaConf.merge(cfg, arm)
            except Exception as err:  # a typed config refused the arm's value
                raise ConfigError(f"design.factors: arm {name} cannot be applied: {err}") from None
    with open_dict(cfg):
        cfg.ablation = {"factor": "factorial", "level": design.signs(run)}
    return cfg
