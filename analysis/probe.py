"""Linear position probes: ridge regression from a hidden state to its position."""

from __future__ import annotations

import torch


def ridge_fit_predict(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Ridge regression in float64 on standardised features; lambda = alpha * n_train."""
    x_train, x_test, y_train = x_train.double(), x_test.double(), y_train.double()
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    y_mean = y_train.mean()
    gram = a.T @ a + alpha * len(a) * torch.eye(a.shape[1], dtype=torch.float64)
    beta = torch.linalg.solve(gram, a.T @ (y_train - y_mean))
    return b @ beta + y_mean


def r2(y: torch.Tensor, pred: torch.Tensor) -> float:
    y, pred = y.double(), pred.double()
    return (1 - (y - pred).pow(2).sum() / (y - y.mean()).pow(2).sum()).item()


def position_probe(
    resid: torch.Tensor, train: torch.Tensor, min_pos: int = 1, alpha: float = 1e-2
) -> dict:
    """Probe x_i -> i and x_i -> log(1 + i), fit on sequences where `train` is True and
    scored on the others (held out by sequence, never by position).

    resid (N, T, d). Positions below `min_pos` are left out: with BOS, position 0 holds a
    unique token and would be decodable from its identity alone, not from leakage.
    Returns held-out R^2 for both targets and the mean absolute error in positions.
    """
    _, T, d = resid.shape
    pos = torch.arange(min_pos, T, dtype=torch.float64)
    x = resid[:, min_pos:, :]
    x_train, x_test = x[train].reshape(-1, d), x[~train].reshape(-1, d)
    y_train = pos.repeat(int(train.sum()))
    y_test = pos.repeat(int((~train).sum()))
    pred = ridge_fit_predict(x_train, y_train, x_test, alpha)
    pred_log = ridge_fit_predict(x_train, y_train.log1p(), x_test, alpha)
    return {
        "probe_r2": r2(y_test, pred),
        "probe_r2_log": r2(y_test.log1p(), pred_log),
        "probe_mae": (pred - y_test).abs().mean().item(),
        "probe_mae_log": (pred_log.expm1() - y_test).abs().mean().item(),
    }
