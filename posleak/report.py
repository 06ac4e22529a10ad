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
    diffs: tuple = ()  # the paired differences themselves

    @property
    def finding(self) -> bool:
        """Enough paired seeds and an interval that excludes zero (before any correction)."""
        return self.n >= MIN_SEEDS and (self.lo > 0 or self.hi < 0)

    @property
    def sd(self) -> float:
        m = self.mean
        return math.sqrt(sum((d - m) ** 2 for d in self.diffs) / (self.n - 1))

    @property
    def p(self) -> float:
        """The paired t-test's two-sided p-value (1 when the differences do not vary)."""
        if self.sd == 0:
            return 0.0 if self.mean != 0 else 1.0
        return t_two_sided_p(self.mean / (self.sd / math.sqrt(self.n)), self.n - 1)


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
        return PairedDifference(mean, math.nan, math.nan, n, tuple(diffs))
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, tuple(diffs))


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


# One-sided 80% quantiles t_{0.80, df} for df = 1..30 (the power term of the detectable effect).
_T80 = (
    1.3764, 1.0607, 0.9785, 0.9410, 0.9195, 0.9057, 0.8960, 0.8889, 0.8834, 0.8791,
    0.8755, 0.8726, 0.8702, 0.8681, 0.8662, 0.8647, 0.8633, 0.8620, 0.8610, 0.8600,
    0.8591, 0.8583, 0.8575, 0.8569, 0.8562, 0.8557, 0.8551, 0.8546, 0.8542, 0.8538,
)  # fmt: skip
_Z80 = 0.8416212335729143


def t_quantile_80(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    return _T80[df - 1] if df <= len(_T80) else _Z80 + (_Z80**3 + _Z80) / (4 * df)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: the regularised incomplete
    beta function I_x(df/2, 1/2) at x = df / (df + t^2), by its continued fraction."""
    x = df / (df + t * t)
    return _incomplete_beta(x, df / 2, 0.5)


def _incomplete_beta(x: float, a: float, b: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only on this side
        return 1.0 - _incomplete_beta(1 - x, b, a)
    c, d, f = 1.0, 1.0 - (a + b) * x / (a + 1), 0.0
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    f = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-300 else 1e-300
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * f / a


def sign_flip_p(diffs: list[float]) -> float:
    """The exact two-sided sign-flip p-value of a mean of paired differences: the share of
    the 2^n sign patterns whose |mean| reaches the observed one (n <= 20)."""
    n = len(diffs)
    if not 1 <= n <= 20:
        raise ValueError(f"the exact sign-flip test enumerates 2^n patterns; n = {n}")
    observed = abs(sum(diffs)) - 1e-12 * sum(abs(d) for d in diffs)
    hits = 0
    for pattern in range(1 << n):
        total = sum(d if pattern >> k & 1 else -d for k, d in enumerate(diffs))
        hits += abs(total) >= observed
    return hits / (1 << n)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given)."""
    order = sorted(range(len(pvalues)), key=lambda k: pvalues[k])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[k]))
        adjusted[k] = running
    return adjusted


def minimum_detectable(sd: float, n: int) -> float:
    """The smallest mean difference a two-sided 5% paired t-test detects with 80% power at
    n pairs and this spread: (t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n)."""
    return (t_quantile_975(n - 1) + t_quantile_80(n - 1)) * sd / math.sqrt(n)


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


def difference_cell(d: PairedDifference | None, holm_p: float | None) -> str:
    """A paired difference for a table cell: interval, t-test p, Holm-adjusted p (the
    table's family), the sign-flip p below 6 seeds, and **finding** or the MDE of a null."""
    if d is None:
        return "–"
    if d.n < MIN_SEEDS:
        interval = "" if d.n < 2 else f" [{number(d.lo)}, {number(d.hi)}]"
        return f"{number(d.mean)}{interval} (n={d.n} < {MIN_SEEDS}: no test)"
    text = f"{number(d.mean)} [{number(d.lo)}, {number(d.hi)}], p {number(d.p, 2)}"
    text += f", Holm {number(holm_p, 2)}"
    if d.n < 6:
        text += f", sign-flip p {number(sign_flip_p(list(d.diffs)), 2)}"
    if holm_p < 0.05:
        return text + " **finding**"
    mde = number(minimum_detectable(d.sd, d.n), 2)
    if d.p < 0.05:  # its own interval excludes 0; the family's correction decides
        return text + f"; not a finding after Holm, though its interval excludes 0 (MDE {mde})"
    return text + f"; not detected (MDE {mde})"
