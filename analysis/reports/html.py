"""A self-contained HTML page from the Markdown report: headings, paragraphs, tables and images,
with every figure embedded as a data URI so that the page opens in a browser with no server."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

INLINE = (
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\[([^\]]+)\]\(([^)]+)\)"), r'<a href="\2">\1</a>'),
)
STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}td.num{text-align:right}"
    "img{max-width:100%;display:block;margin:1em 0}"
)


def inline(text: str) -> str:
    text = html.escape(text, quote=False)
    for pattern, replacement in INLINE:
        text = pattern.sub(replacement, text)
    return text


def image(line: str, folder: Path) -> str:
    alt, name = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line).groups()
    data = base64.b64encode((folder / name).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(rows: list[str]) -> str:
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    head, rule, body = cells[0], cells[1], cells[2:]  # the rule: ---: right-aligns a column
    right = [c.endswith(":") for c in rule]
    out = ["<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"]
    out += [
        "<tr>"
        + "".join(
            f'<td class="num">{inline(c)}</td>'
            if j < len(right) and right[j]
            else f"<td>{inline(c)}</td>"
            for j, c in enumerate(r)
        )
        + "</tr>"
        for r in body
    ]
    return "\n".join(out) + "</table>"


def to_html(markdown: str, folder: Path, title: str) -> str:
    """The report's Markdown (the subset posleak writes) as one HTML page; images from folder."""
    parts, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            parts.append(table(lines[start:i]))
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            parts.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            parts.append(image(line, folder))
        elif line.startswith("- "):
            parts.append(f"<ul><li>{inline(line[2:])}</li></ul>")
        elif line.strip():
            parts.append(f"<p>{inline(line)}</p>")
        i += 1
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )
