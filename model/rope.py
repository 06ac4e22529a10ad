"""Rotary position embedding: the single source of truth for frequencies and rotation.

Pairing is rotate-half (dimension p rotates with p + d/2), as in Llama, so the score
<R_i q, R_j k> depends on positions only through i - j. `apply_rope` is the textbook formula
(the reference the tests hold the model to); `rotate` computes the same numbers in fewer
passes over memory and is what the decoder runs.
"""

from __future__ import annotations

import math

import torch


def ntk_base(base: float, scale: float, d_head: int) -> float:
    """Static NTK-aware base b' = b * s^(d/(d-2)).

    The highest frequency (p = 0) is unchanged and the lowest (p = d/2 - 1) is divided by s.
    """
    if scale == 1:
        return base
    if d_head <= 2:
        raise ValueError(f"NTK scaling needs a head dimension of at least 4, got {d_head}")
    return base * scale ** (d_head / (d_head - 2))


def turning_pairs(base: float, d_head: int, seq_len: int) -> int:
    """How many rotary pairs complete at least one turn within seq_len positions
    (omega_p * seq_len >= 2 pi): the pairs that tell positions apart by angle within the
    context. NTK scaling changes position only through the pairs it moves out of this set."""
    return int((rope_frequencies(d_head, base) * seq_len >= 2 * math.pi).sum())


def rope_frequencies(d_head: int, base: float, dtype=torch.float64) -> torch.Tensor:
    """omega_p = base^(-2p/d) for p = 0 .. d/2 - 1."""
    p = torch.arange(d_head // 2, dtype=torch.float64)
    return (base ** (-2.0 * p / d_head)).to(dtype)


def rope_angles(seq_len: int, d_head: int, base: float) -> torch.Tensor:
    """position * omega, (T, d_head / 2), in float64."""
    return torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_frequencies(d_head, base))


def rope_tables(seq_len: int, d_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * omega, shaped (T, d_head) for rotate-half, computed in float64."""
    angles = rope_angles(seq_len, d_head, base)
    angles = torch.cat([angles, angles], dim=-1)  # (T, d_head)
    return angles.cos().float(), angles.sin().float()


def rope_half_tables(seq_len: int, d_head: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * omega, (T, d_head / 2): the tables `rotate` takes."""
    angles = rope_angles(seq_len, d_head, base)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d_head) by the position tables (T, d_head)."""
    return x * cos + rotate_half(x) * sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with half-width tables (cos, sin broadcast against x[..., : d_head / 2]).

    The same products and sums as the formula, so the same numbers, in two passes per half
    instead of five over the whole tensor; its backward is the inverse rotation (angle −θ),
    written out, so autograd neither splits the gradient into branches nor adds them up.
    Under torch.compile it is the plain formula, which the compiler fuses by itself.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return _Rotation.apply(x, cos, sin)


class _Rotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotated(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotated(grad, cos, sin, -1.0), None, None


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """[x1 cos − x2 sin·sign, x2 cos + x1 sin·sign] for x = [x1, x2]: sign −1 rotates back."""
    first, second = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    out_first, out_second = out.chunk(2, dim=-1)
    torch.mul(first, cos, out=out_first).addcmul_(second, sin, value=-sign)
    torch.mul(second, cos, out=out_second).addcmul_(first, sin, value=sign)
    return out
