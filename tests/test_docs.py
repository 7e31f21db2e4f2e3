"""What the docs say about the code stays true: every switch listed with its schema default, the README a
guide of about 15 KB whose links resolve."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from alexnet.config import DataConfig, DevicesConfig, OptimizerConfig
from alexnet.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "devices": DevicesConfig}
# Defaults the docs give as the shipped YAML's rather than the schema's (the schema cannot know a path).
FROM_YAML = {"data.root", "data.cache_dir"}


def as_doc(value) -> str:
    value = getattr(value, "value", value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def documented() -> dict[str, str]:
    """``key -> default`` from the tables of docs/switches.md (a row may list several keys and defaults)."""
    found = {}
    for line in (ROOT / "docs" / "switches.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[2])  # every table: key | values | default | ...
        for key, default in zip(keys, defaults, strict=False):
            found[key] = default
    return found


def test_every_switch_is_documented_with_its_default():
    docs = documented()
    for section, schema in SCHEMAS.items():
        instance = schema(root="-") if schema is DataConfig else schema()
        for f in fields(schema):
            key = f"{section}.{f.name}"
            assert key in docs, f"docs/switches.md does not list {key}"
            if key not in FROM_YAML:
                value = getattr(instance, f.name)
                assert docs[key] == as_doc(value), (
                    f"docs/switches.md: {key} default {docs[key]!r} != {value!r}"
                )


def test_the_readme_is_a_guide_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 16_000, "the README is a guide: reference material goes to docs/"
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    order = [
        readme.index(s)
        for s in ("experiment=smoke", "experiment=quick", "python -m pytest", "experiment=cpu")
    ]
    assert order == sorted(order), "smoke run, main job, tests, full-size runs: in that order"


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_doc_links_resolve(doc: Path):
    """Relative to the file they are in, as a reader's browser resolves them."""
    for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
        if not target.startswith("http"):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, not a file beside it"


def test_the_results_page_names_the_command_and_n_of_every_row():
    """docs/results.md is the report's Markdown: every row of its verdict tables says how many seeds it
    rests on and the command that made its runs; the page says where its numbers come from."""
    page = (ROOT / "docs" / "results.md").read_text()
    assert "## Where these numbers come from" in page and "machine:" in page and "commit" in page
    rows = 0
    header = None
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            header = None
            continue
        if header is None:
            header = cells
            continue
        if set(line) <= set("|-") or "command" not in header:
            continue
        row = dict(zip(header, cells, strict=True))
        assert re.match(r"^\d+( \(\+\d+ not finished\))?$", row["n"]), row
        assert row["command"].startswith("`python src/train.py -m "), row
        assert row["verdict"] and row["Holm"], row
        rows += 1
    assert rows >= 1
    # Every claim is on the page: measured in a table, or listed with the command that would add its runs.
    for claim in yaml.safe_load((ROOT / "conf" / "claims.yaml").read_text())["claims"].values():
        assert claim["title"] in page, claim["title"]


# The prose that reports results of today's runs: each of its numbers is checked against the page it comes
# from. (protocol.md's sections on P6 and P10 quote docs/results-p10.md, a page that cannot be made again.)
RESULT_PROSE = [
    ("README.md", "## What the CPU scale found"),
    ("docs/protocol.md", "## The annealed protocol"),
    ("docs/protocol.md", "## Every claim, run by run"),
    ("docs/protocol.md", "## The overfitting regime"),
]


def section_of(path: str, heading: str) -> str:
    text = (ROOT / path).read_text()
    assert heading in text, f"{path} has no section {heading!r}"
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize(("path", "heading"), RESULT_PROSE)
def test_every_result_number_in_the_prose_is_on_the_page(path: str, heading: str):
    """Deltas and interval bounds (signed, two decimals) appear on docs/results.md as written; half-widths
    (±x.xx) are a row's; seed-to-seed SDs ("SD x.xx") are a noise-table cell: prose included, not only
    tables, so no number can go stale when the page is made again."""
    page = (ROOT / "docs" / "results.md").read_text()
    rows = json.loads((ROOT / "docs" / "results.json").read_text())
    halves = {f"{(r['hi'] - r['lo']) / 2:.2f}" for r in rows if r["lo"] is not None and r["hi"] is not None}
    prose = section_of(path, heading)
    for number in re.findall(r"(?<![\w.])[-+]\d+\.\d\d(?!\d)", prose):
        assert number in page, f"{path} ({heading}): {number} is not on docs/results.md"
    for half in re.findall(r"±(\d+\.\d\d)", prose):
        assert half in halves, f"{path} ({heading}): ±{half} is no row's half-width in docs/results.json"
    for sd in re.findall(r"SD (\d+\.\d\d)", prose):
        assert f"| {sd} |" in page, f"{path} ({heading}): SD {sd} is not in a noise table of docs/results.md"
