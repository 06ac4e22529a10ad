"""The report kit every report shares (compare, study, sweep summaries, HTML): Markdown
tables, number format, and intervals over seeds (t-intervals, paired by seed).

Pure Python, no torch: the sweep (train/) and the analysis reports use the same functions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30.
_T975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851,
    2.364624252, 2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830,
    2.160368656, 2.144786688, 2.131449546, 2.119905299, 2.109815578, 2.100922040,
    2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
    2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456,
)  # fmt: skip
_Z975 = 1.959963984540054
MIN_SEEDS = 3  # fewer paired seeds than this: no difference is called a finding


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: a table up to 30 degrees of freedom, the Cornish-Fisher expansion above."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = _Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


class PairedDifference(NamedTuple):
    mean: float
    lo: float  # 95% t-interval (NaN with a single pair)
    hi: float
    n: int

    @property
    def finding(self) -> bool:
        """Enough paired seeds and an interval that excludes zero."""
        return self.n >= MIN_SEEDS and (self.lo > 0 or self.hi < 0)


def paired_difference(values: dict, reference: dict) -> PairedDifference | None:
    """Mean of values[seed] - reference[seed] over the seeds both have, with a 95% t-interval
    (n - 1 degrees of freedom). None when no seed is shared."""
    seeds = sorted(
        s for s in set(values) & set(reference) if _finite(values[s]) and _finite(reference[s])
    )
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def mean_interval(values) -> tuple[float, float, float, int] | None:
    """Mean of the finite values with its 95% t-interval (NaN bounds with a single value)."""
    vals = [v for v in values if _finite(v)]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return mean, math.nan, math.nan, 1
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


def number(x, digits: int = 4) -> str:
    """A number as reports print it: `digits` significant digits, "–" for none."""
    return "–" if x is None else f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table: a header row, the rule, one line per row (cells' "|" escaped)."""

    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
