"""Rotary position embedding: the single source of truth for frequencies and rotation.

Pairing is rotate-half (dimension p rotates with p + d/2), as in Llama, so the score
<R_i q, R_j k> depends on positions only through i - j.
"""

from __future__ import annotations

import torch


def ntk_base(base: float, scale: float, d_head: int) -> float:
    """Static NTK-aware base b' = b * s^(d/(d-2)).

    The highest frequency (p = 0) is unchanged and the lowest (p = d/2 - 1) is divided by s.
    """
    return base * scale ** (d_head / (d_head - 2))


def rope_frequencies(d_head: int, base: float, dtype=torch.float64) -> torch.Tensor:
    """omega_p = base^(-2p/d) for p = 0 .. d/2 - 1."""
    p = torch.arange(d_head // 2, dtype=torch.float64)
    return (base ** (-2.0 * p / d_head)).to(dtype)


def rope_tables(seq_len: int, d_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * omega, shaped (T, d_head) for rotate-half, computed in float64."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_frequencies(d_head, base))
    angles = torch.cat([angles, angles], dim=-1)  # (T, d_head)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d_head) by the position tables (T, d_head)."""
    return x * cos + rotate_half(x) * sin
