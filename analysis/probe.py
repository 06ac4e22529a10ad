"""Linear position probes: ridge regression from a hidden state to its position, with the
ridge strength chosen by cross-validation grouped by sequence.

A fixed, large ridge hides position that lives in a low-variance direction of the residual
stream; cross-validating over a wide grid finds it when it is there and shrinks when it is
not. Fit on half A of the sequences, scored on half B (held out by sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# ridge strength per training row, on standardised features: 1e-6 .. 1e3 in half decades
LAMBDA_GRID = tuple(10.0 ** (k / 2) for k in range(-12, 7))
TARGETS = {"linear": lambda pos: pos, "log": torch.log1p}


class Probe(NamedTuple):
    mean: torch.Tensor  # (d,) feature standardisation, from the training half
    scale: torch.Tensor  # (d,)
    beta: torch.Tensor  # (d,)
    intercept: float
    lam: float  # chosen ridge strength per training row
    target: str  # "linear" (i) or "log" (log(1 + i))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted target for features x (..., d)."""
        return ((x.double() - self.mean) / self.scale) @ self.beta + self.intercept


class Moments(NamedTuple):
    """Sufficient statistics of a ridge fit: row count, sums, and cross products."""

    n: float
    z: torch.Tensor  # (d,) sum of features
    y: torch.Tensor  # () sum of targets
    zz: torch.Tensor  # (d, d)
    zy: torch.Tensor  # (d,)

    @classmethod
    def of(cls, z: torch.Tensor, y: torch.Tensor) -> Moments:
        return cls(float(len(z)), z.sum(0), y.sum(), z.T @ z, z.T @ y)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(*(a - b for a, b in zip(self, other, strict=True)))


def _ridge_path(m: Moments, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (d, len(grid)) and intercepts of centred ridge fits for every strength."""
    mu, y_mean = m.z / m.n, m.y / m.n
    evals, evecs = torch.linalg.eigh(m.zz - m.n * torch.outer(mu, mu))
    proj = evecs.T @ (m.zy - m.n * mu * y_mean)  # (d,)
    lam = torch.tensor(grid, dtype=torch.float64) * m.n
    coef = evecs @ (proj[:, None] / (evals.clamp(min=0)[:, None] + lam[None, :]))
    return coef, y_mean - mu @ coef


def fit(
    x: torch.Tensor,
    positions: torch.Tensor,
    groups: torch.Tensor,
    target: str,
    grid=LAMBDA_GRID,
    folds: int = 5,
) -> Probe:
    """Ridge probe x (n, d) -> target(positions); lambda by `folds`-fold CV over `groups`
    (the sequence of each row, so that no sequence is split between fit and score)."""
    x, y = x.double(), TARGETS[target](positions.double())
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-12)
    z = (x - mean) / scale
    fold_of = groups % folds
    parts = [(fold_of == f) for f in range(folds)]
    moments = [Moments.of(z[held], y[held]) for held in parts]
    total = Moments.of(z, y)
    sse = torch.zeros(len(grid), dtype=torch.float64)
    for held, m in zip(parts, moments, strict=True):
        if m.n == 0 or m.n == total.n:
            continue
        coef, intercept = _ridge_path(total - m, grid)
        sse += (z[held] @ coef + intercept - y[held, None]).pow(2).sum(0)
    best = int(sse.argmin())
    coef, intercept = _ridge_path(total, grid[best : best + 1])
    return Probe(mean, scale, coef[:, 0], float(intercept[0]), grid[best], target)


class Score(NamedTuple):
    r2: float
    mae: float  # in positions (a log-target prediction is mapped back first)
    seq_sse: torch.Tensor  # (N,) per held-out sequence: for bootstrap intervals
    seq_sst: float  # sum of squares of the target about its mean, per sequence


def score(probe: Probe, resid: torch.Tensor, positions: torch.Tensor) -> Score:
    """Held-out R^2 and MAE of a probe on resid (N, len(positions), d)."""
    y = TARGETS[probe.target](positions.double())
    pred = probe.predict(resid)  # (N, P)
    sse = (pred - y).pow(2).sum(-1)
    sst = (y - y.mean()).pow(2).sum().item()
    in_positions = pred.expm1() if probe.target == "log" else pred
    mae = (in_positions - positions.double()).abs().mean().item()
    return Score(1 - sse.sum().item() / (sst * len(sse)), mae, sse, sst)


def mean_baseline_mae(train_positions: torch.Tensor, test_positions: torch.Tensor) -> float:
    """MAE of always predicting the training mean position: the honest floor."""
    return (test_positions.double() - train_positions.double().mean()).abs().mean().item()


def r2_interval(s: Score, weights: torch.Tensor) -> tuple[float, float]:
    """95% bootstrap interval of R^2 over held-out sequences (weights: replicates x N)."""
    r2 = 1 - (weights @ s.seq_sse) / (weights.sum(1) * s.seq_sst)
    lo, hi = torch.quantile(r2, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return lo.item(), hi.item()
