"""The Markdown kit every report shares (the sweep's summary in train/, the analysis reports):
tables and the number format. Statistics over seeds are in analysis/maths/seeds.py."""

from __future__ import annotations

import re

NUMERIC = re.compile(r"[-−+]?(\d|\.\d|inf|nan)|–$")  # a number (maybe with its interval), or none


def number(x, digits: int = 3) -> str:
    """A number as reports print it: `digits` significant digits, "–" for none."""
    return "–" if x is None else f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table: a header row, the rule, one line per row (cells' "|" escaped). A
    column of numbers (a dash where there is none) is right-aligned, so digits line up."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    def numeric(j: int) -> bool:
        cells = [str(r[j]).strip() for r in rows if j < len(r)]
        return any(c != "–" for c in cells) and all(NUMERIC.match(c) for c in cells)

    rule = "|" + "".join("---:|" if numeric(j) else "---|" for j in range(len(header)))
    return [line(header), rule, *(line(r) for r in rows)]
