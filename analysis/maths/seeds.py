"""Statistics over seeds, paired by seed: t-intervals and p-values (scipy.stats), the exact
sign-flip p for few seeds, Holm's step-down adjustment and the minimum detectable effect at
the level that decides a cell (the noncentral t). Intervals within a run (bootstrap over
sequences) are in stats.py.

Holm and the sign-flip enumeration stay hand-written: each is a few lines whose definition
is the test, and neither is in scipy in the form a verdict table needs (Holm over one table's
tested cells; the exact two-sided sign-flip p of a mean)."""

from __future__ import annotations

import math
from typing import NamedTuple

from scipy import optimize, stats

MIN_SEEDS = 3  # fewer paired seeds than this: no difference is called a finding
POWER = 0.80  # the power at which a null states its minimum detectable effect


def t_quantile(q: float, df: int) -> float:
    """The q quantile of Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    return float(stats.t.ppf(q, df))


def t_quantile_975(df: int) -> float:
    return t_quantile(0.975, df)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return float(2 * stats.t.sf(abs(t), df))


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


def power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """The power of a two-sided level-alpha paired t-test at n pairs against a true mean
    difference `effect` with this spread: the noncentral t's mass beyond the critical value."""
    df, crit = n - 1, t_quantile(1 - alpha / 2, n - 1)
    ncp = effect * math.sqrt(n) / sd
    upper, lower = float(stats.nct.sf(crit, df, ncp)), float(stats.nct.cdf(-crit, df, ncp))
    return upper + (0.0 if math.isnan(lower) else lower)  # scipy's far tail underflows to NaN


def minimum_detectable(sd: float, n: int, alpha: float = 0.05) -> float:
    """The smallest mean difference a two-sided level-alpha paired t-test detects with 80%
    power at n pairs and this spread (exact, by the noncentral t). alpha is the level that
    decides the cell: alpha / m for the first step of a Holm family of m cells."""
    if n < 2 or not sd > 0:
        return math.nan
    scale = sd / math.sqrt(n)
    # twice the normal-approximation effect has power near 1 (and a noncentrality small
    # enough for scipy's noncentral t to stay finite)
    high = 2 * (t_quantile(1 - alpha / 2, n - 1) + t_quantile(POWER, n - 1)) * scale
    return float(optimize.brentq(lambda d: power(d, sd, n, alpha) - POWER, 0.0, high))


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
