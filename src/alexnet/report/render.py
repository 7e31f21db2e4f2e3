"""The report as one structure (``Document``: sections of paragraphs, bullet lists, tables and images) and
its two writers, Markdown and HTML, which walk that same structure. Text uses two inline marks, **bold**
and `code`, which the HTML writer turns into tags."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    file: str
    alt: str


@dataclass
class Bullets:
    items: list[str]


Block = str | Bullets | Table | Image


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2


@dataclass
class Document:
    title: str
    sections: list[Section] = field(default_factory=list)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def table_lines(table: Table) -> list[str]:
    head = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    return head + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]


def markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", ""]
    for section in doc.sections:
        lines += [f"{'#' * section.level} {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += table_lines(block)
            elif isinstance(block, Bullets):
                lines += [f"- {item}" for item in block.items]
            elif isinstance(block, Image):
                lines.append(f"![{block.alt}]({block.file})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


_BOLD, _CODE = re.compile(r"\*\*(.+?)\*\*"), re.compile(r"`(.+?)`")


def _inline(text: str) -> str:
    return _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<b>\1</b>", html.escape(text, quote=False)))


def to_html(doc: Document) -> str:
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(doc.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:90em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}"
        "img{max-width:48em}code{font-size:90%}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for section in doc.sections:
        parts.append(f"<h{section.level}>{_inline(section.title)}</h{section.level}>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{_inline(c)}</th>" for c in block.header)
                body = "".join(
                    "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows
                )
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Bullets):
                parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Image):
                parts.append(f"<p><img src='{html.escape(block.file)}' alt='{html.escape(block.alt)}'></p>")
            else:
                parts.append(f"<p>{_inline(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
