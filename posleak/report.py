"""The Markdown kit every report shares (the sweep's summary in train/, the analysis reports):
tables and the number format. Statistics over seeds are in analysis/maths/seeds.py."""

from __future__ import annotations


def number(x, digits: int = 4) -> str:
    """A number as reports print it: `digits` significant digits, "–" for none."""
    return "–" if x is None else f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table: a header row, the rule, one line per row (cells' "|" escaped)."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
