"""Intervals: paired-by-seed t-intervals across runs, bootstrap intervals within a run."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

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


def bootstrap_weights(n_units: int, replicates: int, seed: int = 0) -> torch.Tensor:
    """(replicates, n_units) multiplicities of a bootstrap resample of n_units units."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_units, (replicates, n_units), generator=gen)
    return torch.zeros(replicates, n_units, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(replicates, n_units, dtype=torch.float64)
    )


def percentile_interval(replicates: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """The 2.5% and 97.5% quantiles of bootstrap replicates along `dim` (NaNs ignored)."""
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    lo, hi = torch.nanquantile(replicates.double(), q, dim=dim)
    return lo, hi
