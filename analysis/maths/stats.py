"""Bootstrap intervals within a run (over sequences). Intervals across runs, paired by seed,
are in seeds.py."""

from __future__ import annotations

import torch


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
