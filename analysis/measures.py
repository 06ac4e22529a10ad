"""The measurements of ../shared/science.md as pure functions over cached tensors.

Shapes: scores (N, H, T, T) pre-softmax logits with masked entries at -inf; visible (T, T)
boolean mask; everything is computed in float64. Masked entries never enter a statistic.
"""

from __future__ import annotations

import math

import torch


def relative_profile(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """g(delta) per head: mean of s_ij over visible pairs with i - j = delta, pooled over
    sequences and queries. (H, T); NaN for offsets with no visible pair."""
    _, H, T, _ = scores.shape
    out = torch.full((H, T), float("nan"), dtype=torch.float64)
    for delta in range(T):
        if not visible.diagonal(-delta).any():
            continue
        diag = scores.diagonal(offset=-delta, dim1=-2, dim2=-1).double()  # (N, H, T - delta)
        out[:, delta] = diag.mean(dim=(0, 2))
    return out


def offset_table(g: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """G[h, i, j] = g[h, i - j] on visible pairs, -inf elsewhere: the purely relative logits."""
    T = visible.shape[0]
    delta = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0)
    table = g[:, delta]  # (H, T, T)
    return table.masked_fill(~visible, float("-inf"))


def c_mask(g: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """C_mask(i) = log sum_{j in W(i)} exp g(i - j): the log normaliser a purely relative
    query would have at position i. (H, T)."""
    return torch.logsumexp(offset_table(g, visible), dim=-1)


def c_res(scores: torch.Tensor, g: torch.Tensor, visible: torch.Tensor) -> dict:
    """Absolute residue r_ij = s_ij - g(i - j); per sequence, head and query the mean of
    |r| (`abs`) and of r^2 (`var`) over visible keys. Each (N, H, T)."""
    table = offset_table(g, visible)
    residue = (scores.double() - table).masked_fill(~visible, 0.0)
    count = visible.sum(-1).double()  # (T,)
    return {
        "abs": residue.abs().sum(-1) / count,
        "var": residue.pow(2).sum(-1) / count,
    }


def delta_r2(scores: torch.Tensor, visible: torch.Tensor, train: torch.Tensor) -> dict:
    """Per head: held-out R^2 of s_ij regressed on [i-j, 1] and on [i-j, i, j, 1].

    The full design has rank 3 (i - j is a combination of i and j), so [i-j, i, 1] spans it.
    Fit on sequences where `train` is True, score on the rest. Returns (H,) tensors
    `r2_rel`, `r2_full` and `delta` = r2_full - r2_rel.
    """
    i, j = visible.nonzero(as_tuple=True)
    y = scores[:, :, i, j].double()  # (N, H, P)
    one = torch.ones_like(i, dtype=torch.float64)
    designs = {
        "r2_rel": torch.stack([(i - j).double(), one], dim=1),
        "r2_full": torch.stack([(i - j).double(), i.double(), one], dim=1),
    }
    y_train, y_test = y[train], y[~train]
    mean_train = y_train.mean(0)  # (H, P): same design for every sequence
    out = {}
    for name, X in designs.items():
        beta = torch.linalg.lstsq(X, mean_train.T).solution  # (k, H)
        pred = (X @ beta).T  # (H, P)
        sse = (y_test - pred).pow(2).sum(dim=(0, 2))
        sst = (y_test - y_test.mean(dim=(0, 2), keepdim=True)).pow(2).sum(dim=(0, 2))
        out[name] = 1 - sse / sst
    out["delta"] = out["r2_full"] - out["r2_rel"]
    return out


def sink_alpha(first_column: torch.Tensor) -> torch.Tensor:
    """alpha_0 per sequence and head: mean over queries i >= 1 of A_i0. Input (N, H, T)."""
    return first_column[:, :, 1:].double().mean(-1)


def fingerprint(x0: torch.Tensor) -> dict:
    """Dispersion across inputs of position-0 states x0 (N, d): std/||mean|| and the mean
    pairwise cosine similarity (1 and 0 when every input gives the same vector)."""
    x = x0.double()
    mean = x.mean(0)
    spread = (x - mean).pow(2).sum(-1).mean().sqrt()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    n = x.shape[0]
    cos = (unit @ unit.T).sum().sub(n).div(n * (n - 1))
    return {"dispersion": (spread / mean.norm()).item(), "cosine": cos.item()}


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance (base 2, in [0, 1]) between distributions along the last dim."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a / b.clamp_min(1e-300)).log2(), torch.zeros_like(a)).sum(-1)

    return ((kl(p, m) + kl(q, m)) / 2).clamp_min(0).sqrt()


def uniform_guess_mae(n: int) -> float:
    """E|X - Y| for X, Y independent and uniform on n positions: (n^2 - 1) / (3n)."""
    return (n * n - 1) / (3 * n)


def removed_fraction(swapped: float, original: float) -> float:
    """1 - swapped / original; NaN when the original is zero."""
    return 1 - swapped / original if original else math.nan
