"""Attention visibility: which keys j each query i may see."""

from __future__ import annotations

import torch


def attention_mask(seq_len: int, window: int | None = None, device=None) -> torch.Tensor:
    """Boolean (T, T) mask, True where key j is visible to query i.

    Visible iff j <= i and, under a sliding window of w keys (self included), i - j < w.
    A window >= T is exactly full causal attention.
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= (i - j) < window
    return visible
