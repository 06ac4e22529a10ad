"""The change of next-token loss under an intervention, by target group: shared by the
key-0 knockout's loss stage and the BOS replacement."""

from __future__ import annotations

import torch

from posleak.analysis.maths.stats import percentile_interval


def target_groups(copy_targets, tokens: torch.Tensor) -> dict:
    """{group: (N, T) mask over next-token targets}: all, and copy / other when marked."""
    everything = torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    if copy_targets is None:
        return {"all": everything}
    copies = torch.from_numpy(copy_targets(tokens.numpy())[:, 1:])
    return {"all": everything, "copy": copies, "other": ~copies}


def record_change(analysis, metric: str, condition: dict, change, mask, weights) -> None:
    """The mean change over the masked targets, by sequence, with a bootstrap interval over
    sequences (a sequence without such targets counts for nothing)."""
    count = mask.sum(1).double()
    if not count.any():
        return
    total = (change * mask).sum(1)
    mean = (total.sum() / count.sum()).item()
    boot = (weights @ total) / (weights @ count)
    lo, hi = percentile_interval(boot)
    n = int((count > 0).sum())
    analysis.rec.add(metric, mean, condition=condition, lo=lo, hi=hi, n=n)
