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
    """Sufficient statistics of a ridge fit on standardised features z and a target y."""

    n: float
    z: torch.Tensor  # (d,) sum of features
    y: torch.Tensor  # () sum of targets
    zz: torch.Tensor  # (d, d)
    zy: torch.Tensor  # (d,)
    yy: torch.Tensor  # () sum of squared targets


def _ridge_path(m: Moments, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (d, len(grid)) and intercepts of centred ridge fits for every strength."""
    mu, y_mean = m.z / m.n, m.y / m.n
    evals, evecs = torch.linalg.eigh(m.zz - m.n * torch.outer(mu, mu))
    proj = evecs.T @ (m.zy - m.n * mu * y_mean)  # (d,)
    lam = torch.tensor(grid, dtype=torch.float64) * m.n
    coef = evecs @ (proj[:, None] / (evals.clamp(min=0)[:, None] + lam[None, :]))
    return coef, y_mean - mu @ coef


def _sse(m: Moments, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """sum over the rows of m of (z . coef + intercept - y)^2, for every column of coef."""
    quad = (coef * (m.zz @ coef)).sum(0)
    linear = 2 * intercept * (m.z @ coef) - 2 * (m.zy @ coef)
    return quad + linear + m.n * intercept**2 - 2 * intercept * m.y + m.yy


class ProbeData:
    """Per-fold sums of the features, targets and their products, accumulated batch by batch.

    Memory is folds x d^2 whatever the number of sequences, so a probe on a large model reads
    its residual stream as it streams past. Sums are taken about a shift (the first batch's
    mean) so that large feature means do not cancel precision away. Both targets share the
    feature products."""

    def __init__(self, d: int, folds: int = 5):
        self.folds = folds
        self.shift: torch.Tensor | None = None
        self.n = torch.zeros(folds, dtype=torch.float64)
        self.sx = torch.zeros(folds, d, dtype=torch.float64)
        self.sxx = torch.zeros(folds, d, d, dtype=torch.float64)
        self.sy = {t: torch.zeros(folds, dtype=torch.float64) for t in TARGETS}
        self.syy = {t: torch.zeros(folds, dtype=torch.float64) for t in TARGETS}
        self.sxy = {t: torch.zeros(folds, d, dtype=torch.float64) for t in TARGETS}

    def add(self, x: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor) -> None:
        """Rows x (n, d) at `positions` (n,), in sequences `groups` (n,): fold = group % folds."""
        x = x.double()
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        fold_of = groups % self.folds
        for f in fold_of.unique().tolist():
            rows = fold_of == f
            xf = x[rows]
            self.n[f] += len(xf)
            self.sx[f] += xf.sum(0)
            self.sxx[f] += xf.T @ xf
            for t, transform in TARGETS.items():
                y = transform(positions[rows].double())
                self.sy[t][f] += y.sum()
                self.syy[t][f] += y @ y
                self.sxy[t][f] += xf.T @ y

    def fit(self, target: str, grid=LAMBDA_GRID) -> Probe:
        """Ridge probe on standardised features; lambda by cross-validation over the folds."""
        if self.shift is None:
            raise ValueError("the probe has no rows to fit")
        n = self.n.sum()
        mean = self.sx.sum(0) / n
        var = (self.sxx.sum(0).diagonal() - n * mean**2) / (n - 1)
        scale = var.clamp(min=0).sqrt().clamp_min(1e-12)
        folds = [self._standard(target, f, mean, scale) for f in range(self.folds)]
        total = self._standard(target, slice(None), mean, scale)
        sse = torch.zeros(len(grid), dtype=torch.float64)
        for held in folds:
            if held.n == 0 or held.n == total.n:
                continue
            rest = Moments(*(a - b for a, b in zip(total, held, strict=True)))
            coef, intercept = _ridge_path(rest, grid)
            sse += _sse(held, coef, intercept)
        best = int(sse.argmin())
        coef, intercept = _ridge_path(total, grid[best : best + 1])
        return Probe(self.shift + mean, scale, coef[:, 0], float(intercept[0]), grid[best], target)

    def _standard(self, target: str, part, mean: torch.Tensor, scale: torch.Tensor) -> Moments:
        """The moments of z = (x - mean) / scale over fold `part` (an index or every fold)."""

        def total(t: torch.Tensor) -> torch.Tensor:
            return t[part].sum(0) if isinstance(part, slice) else t[part]

        n, sx, sxx = float(total(self.n)), total(self.sx), total(self.sxx)
        sy, syy, sxy = total(self.sy[target]), total(self.syy[target]), total(self.sxy[target])
        cross = torch.outer(sx, mean)
        centred = sxx - cross - cross.T + n * torch.outer(mean, mean)
        return Moments(
            n,
            (sx - n * mean) / scale,
            sy,
            centred / torch.outer(scale, scale),
            (sxy - mean * sy) / scale,
            syy,
        )


def r2_of_moments(probe: Probe, data: ProbeData) -> float:
    """Held-out R^2 of a probe on the rows summed in `data` (every fold), from their moments
    alone: SSE = w'Sxx w + 2c w'Sx - 2 w'Sxy + n c^2 - 2c Sy + Syy for the prediction w.x + c.
    This scores a probe refit on one half against the other in the same pass."""
    t = probe.target
    n, sx, sxx = data.n.sum(), data.sx.sum(0), data.sxx.sum(0)
    sy, syy, sxy = data.sy[t].sum(), data.syy[t].sum(), data.sxy[t].sum(0)
    w = probe.beta / probe.scale
    c = probe.intercept - w @ probe.mean + w @ data.shift  # data's sums are about its shift
    sse = w @ sxx @ w + 2 * c * (w @ sx) - 2 * (w @ sxy) + n * c**2 - 2 * c * sy + syy
    return (1 - sse / (syy - sy**2 / n)).item()


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
    data = ProbeData(x.shape[-1], folds)
    data.add(x, positions, groups)
    return data.fit(target, grid)


class Score(NamedTuple):
    r2: float
    mae: float  # in positions (a log-target prediction is mapped back first)
    seq_sse: torch.Tensor  # (N,) per held-out sequence: for bootstrap intervals
    seq_sst: float  # sum of squares of the target about its mean, per sequence


class Scorer:
    """A probe's held-out errors, added batch by batch: per-sequence squared errors (for R^2
    and its bootstrap) and absolute errors in positions (for the MAE)."""

    def __init__(self, probe: Probe, positions: torch.Tensor, n: int):
        self.probe, self.positions = probe, positions.double()
        self.y = TARGETS[probe.target](self.positions)
        self.sse = torch.zeros(n, dtype=torch.float64)
        self.abs_err = torch.zeros(n, dtype=torch.float64)

    def add(self, resid: torch.Tensor, rows: torch.Tensor) -> None:
        """resid (B, len(positions), d) of sequences `rows`."""
        pred = self.probe.predict(resid)
        self.sse[rows] = (pred - self.y).pow(2).sum(-1)
        in_positions = pred.expm1() if self.probe.target == "log" else pred
        self.abs_err[rows] = (in_positions - self.positions).abs().mean(-1)

    def result(self) -> Score:
        sst = (self.y - self.y.mean()).pow(2).sum().item()
        r2 = 1 - self.sse.sum().item() / (sst * len(self.sse))
        return Score(r2, self.abs_err.mean().item(), self.sse, sst)


def score(probe: Probe, resid: torch.Tensor, positions: torch.Tensor) -> Score:
    """Held-out R^2 and MAE of a probe on resid (N, len(positions), d)."""
    scorer = Scorer(probe, positions, len(resid))
    scorer.add(resid, torch.arange(len(resid)))
    return scorer.result()


def mean_baseline_mae(train_positions: torch.Tensor, test_positions: torch.Tensor) -> float:
    """MAE of always predicting the training mean position: the honest floor."""
    return (test_positions.double() - train_positions.double().mean()).abs().mean().item()


def r2_replicates(s: Score, weights: torch.Tensor) -> torch.Tensor:
    """(replicates,) bootstrap replicates of R^2 over held-out sequences (weights:
    replicates x N multiplicities)."""
    return 1 - (weights @ s.seq_sse) / (weights.sum(1) * s.seq_sst)


def r2_interval(s: Score, weights: torch.Tensor) -> tuple[float, float]:
    """95% bootstrap interval of R^2 over held-out sequences (weights: replicates x N)."""
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    lo, hi = torch.quantile(r2_replicates(s, weights), q)
    return lo.item(), hi.item()
