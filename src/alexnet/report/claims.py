"""The paper's claims as data (``conf/claims.yaml``), and the arms that test them (``conf/arm/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from alexnet.config import DataConfig
from alexnet.design import Design, design_of
from alexnet.errors import ReportError
from alexnet.identity import flatten
from alexnet.model import ModelConfig

ROOT = Path(__file__).resolve().parents[3]
CLAIMS_FILE = ROOT / "conf" / "claims.yaml"
ARMS_DIR = ROOT / "conf" / "arm"
SWEEPS_DIR = ROOT / "conf" / "ablation"
EXPERIMENTS_DIR = ROOT / "conf" / "experiment"
PAPER_ARM = "paper"
KINDS = ("delta", "views", "ratio", "factorial")


@dataclass(frozen=True)
class Measure:
    metric: str
    reported: float | None
    baseline_metric: str | None = None  # kind "views": the metric it is compared with in the same run
    label: str | None = None


@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    section: str
    paper_data: str
    kind: str  # delta | views | ratio | factorial
    direction: int
    measures: tuple[Measure, ...]
    arms: tuple[str, ...] = ()  # the compared arms (conf/arm/); one for most claims
    arch: str = "alexnet"
    tune: tuple[str, ...] = ()
    selection_seeds: tuple[int, ...] = ()  # kind ratio: the seeds that choose the tuned setting
    reported_seeds: tuple[int, ...] = ()  # kind ratio: the seeds to run at the chosen setting
    sweep: str | None = None  # its conf/ablation/ file; None: the command names the arms
    against_overfitting: bool = False  # the paper's reason for the switch (section 4): the report checks it
    primary: str = ""  # the metric whose rows are the claim's primary ones (conf/claims.yaml's primary:)

    @property
    def arm(self) -> str | None:
        return self.arms[0] if self.arms else None

    def design(self) -> Design:
        """A factorial claim's design: the ``design`` node of its sweep file, where the sweep reads it."""
        node = OmegaConf.load(SWEEPS_DIR / f"{self.sweep}.yaml").get("design")
        if node is None:
            raise ReportError(f"{SWEEPS_DIR / f'{self.sweep}.yaml'} has no design: node (claims.{self.name})")
        return design_of(node)


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    claims = []
    for name, c in data["claims"].items():
        c.setdefault("primary", data.get("primary"))
        if c["kind"] not in KINDS:
            raise ReportError(f"{path}: claims.{name}.kind={c['kind']!r}; use one of {', '.join(KINDS)}")
        arms = tuple(c.pop("arms", ())) or ((c.pop("arm"),) if "arm" in c else ())
        for arm in arms if c["kind"] in ("delta", "ratio") else ():
            if not (ARMS_DIR / f"{arm}.yaml").is_file():
                raise ReportError(
                    f"{path}: claims.{name} names arm {arm!r}, which is not a file in {ARMS_DIR}"
                )
        if c["kind"] in ("delta", "ratio") and not arms:
            raise ReportError(f"{path}: claims.{name} needs arm: <an arm of {ARMS_DIR}>")
        sweep = c.pop("sweep", name if (SWEEPS_DIR / f"{name}.yaml").is_file() else None)
        measures = tuple(Measure(**m) for m in c.pop("measures", []))
        if c["primary"] not in {m.metric for m in measures}:
            raise ReportError(
                f"{path}: claims.{name}.primary={c['primary']!r} is not one of its measures' metrics "
                f"({', '.join(m.metric for m in measures)}); name one, or set the file's primary:"
            )
        tuples = {k: tuple(c.get(k, ())) for k in ("tune", "selection_seeds", "reported_seeds")}
        claims.append(Claim(name=name, measures=measures, arms=arms, sweep=sweep, **{**c, **tuples}))
    return claims


@dataclass(frozen=True)
class Arm:
    name: str
    factor: str
    level: str
    values: tuple[tuple[str, str], ...]  # the config keys the arm sets, as logged params

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.values)


def own_preset(sweep: str | None, experiment: str) -> str:
    """The experiment preset a claim's sweep runs at, at the scale ``experiment``: its own when the claim has
    one there (``cpu_figure1`` beside ``cpu``: conf/experiment/<scale>_<sweep>.yaml), else the scale."""
    own = f"{experiment}_{sweep}"
    return own if sweep and (EXPERIMENTS_DIR / f"{own}.yaml").is_file() else experiment


@lru_cache
def load_arm(name: str) -> Arm:
    values = flatten(OmegaConf.to_container(OmegaConf.load(ARMS_DIR / f"{name}.yaml")))
    return Arm(
        name=name,
        factor=str(values["ablation.factor"]),
        level=str(values["ablation.level"]),
        values=tuple(sorted((k, v) for k, v in values.items() if not k.startswith("ablation."))),
    )


def all_arms() -> list[Arm]:
    return [load_arm(p.stem) for p in sorted(ARMS_DIR.glob("*.yaml"))]


def all_arm_keys() -> frozenset[str]:
    return frozenset().union(*(arm.keys for arm in all_arms()))


@lru_cache
def paper_values() -> dict[str, str]:
    """The paper's value of every key an arm flips, as a logged param: the schemas' defaults."""
    defaults = {f"model.{f.name}": getattr(ModelConfig(), f.name) for f in fields(ModelConfig)}
    defaults |= {f"data.{f.name}": getattr(DataConfig(root="-"), f.name) for f in fields(DataConfig)}
    # As train.py logs them: str() of the plain value (True, 0.5, relu, None).
    return {k: str(getattr(v, "value", v)) for k, v in defaults.items() if k in all_arm_keys()}


def level_of(params: dict[str, str], arm: Arm) -> str | None:
    """Where a run stands on one arm's switches: ``paper``, the arm's name, or None (neither). Only the
    arm's own keys count: the context a run is compared in fixes every other key."""
    paper = paper_values()
    if all(params.get(k, paper[k]) == v for k, v in arm.values):
        return arm.name
    if all(params.get(k, paper[k]) == paper[k] for k in arm.keys):
        return PAPER_ARM
    return None


def arm_of(params: dict[str, str]) -> str | None:
    """Which arm a run is, from its switches (not its tags, so that a run that another sweep trained, e.g.
    the factorial's all-paper point, counts too): ``paper`` when every arm key has the paper's value, the
    arm whose keys alone differ, or None (a factorial point, or something else)."""
    paper = paper_values()
    differing = {k for k in paper if params.get(k, paper[k]) != paper[k]}
    if not differing:
        return PAPER_ARM
    for arm in all_arms():
        if arm.keys == differing and all(params.get(k) == v for k, v in arm.values):
            return arm.name
    return None
