"""Positional schemes as objects: how each one enters the decoder, and what it supports.

A scheme may add to the token embedding (a learned absolute table), rotate q and k (RoPE),
or add a bias to the attention scores (ALiBi). The decoder, the analysis and the export ask
the scheme; nothing else tests the name. A new scheme is one class here, registered in
SCHEMES, plus its preset in train/presets.toml.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from posleak.model.rope import ntk_base, rope_half_tables

MAX_ROPE_BASE = 1e12  # beyond this a typo, not a plan
MAX_ROPE_SCALE = 1e6  # NTK's s, trained or at inference (b * s^(d/(d-2)) stays finite)


class Scheme:
    """No position information at all (NoPE): the base every scheme overrides."""

    name = "nope"
    rotary = False  # rotates q and k
    inference_scale = False  # static NTK scaling can be applied at inference
    exportable = False  # a transformers architecture (Llama, Mistral) computes it exactly
    params: ClassVar[dict] = {}  # the scheme's own parameters, with defaults ([model.params])

    def param(self, cfg, name: str):
        """The value of one of this scheme's parameters in cfg (its default if not given)."""
        return cfg.params.get(name, self.params[name])

    def param_problems(self, given: dict) -> list[str]:
        """Parameters no scheme has, or of another type than the default of the scheme that
        has them. A parameter of another scheme is allowed and unused (a base config shared
        by RoPE and NoPE variants may set RoPE's base), except as problems() says."""
        out = []
        declared = {n: d for scheme in reversed(SCHEMES.values()) for n, d in scheme.params.items()}
        declared.update(self.params)
        for name, value in given.items():
            if name not in declared:
                known = ", ".join(sorted(declared))
                out.append(f"params.{name} is not a parameter of any scheme (the schemes' "
                           f"parameters: {known})")  # fmt: skip
                continue
            default = declared[name]
            numeric = isinstance(default, float) and type(value) in (int, float)
            if not (numeric or type(value) is type(default)):
                out.append(f"params.{name} must be a {type(default).__name__}, got {value!r}")
        return out

    def own_params(self, given: dict) -> dict:
        """The parameters this scheme reads, each given or at its default: what a built
        config holds (the others are dropped), so that one model has one spelling."""
        return {name: given.get(name, default) for name, default in self.params.items()}

    def problems(self, cfg) -> list[str]:
        """Why this scheme cannot be built with cfg (each naming the field and the fix)."""
        scale = cfg.params.get("scale", 1.0)
        if "scale" not in self.params and scale != 1:
            return [
                f"params.scale={scale} has no effect with position={self.name!r}; use "
                "position='rope_ntk' to train with NTK scaling, or leave params.scale out (NTK "
                "scaling of a trained RoPE model is applied at analysis time)"
            ]
        return []

    def build(self, cfg) -> dict[str, nn.Module]:
        """Modules the scheme owns, by attribute name on the decoder (initialised by name)."""
        return {}

    def max_len(self, cfg) -> int | None:
        """The longest sequence the scheme can encode, or None for no limit."""
        return None

    def embed(self, model, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The token embedding (B, T, d) at positions start.. start + T - 1, plus whatever the
        scheme adds to it."""
        return x

    def effective_base(self, cfg, inference_scale: float) -> float | None:
        """The RoPE base in use, or None for a scheme without rotation."""
        return None

    def rotation(self, cfg, T: int, inference_scale: float) -> tuple | None:
        """cos and sin tables (T, 1, d_head / 2) for rotating q and k laid out (B, T, H, d_head)
        (model/rope.py's `rotate`), or None."""
        return None

    def score_bias(self, cfg, T: int, device) -> torch.Tensor | None:
        """An additive bias (H, T, T) on the attention scores, or None."""
        return None


class Learned(Scheme):
    """A learned absolute position table added to the embedding (the positive control)."""

    name = "learned"

    def build(self, cfg) -> dict[str, nn.Module]:
        return {"pos_embed": nn.Embedding(cfg.max_seq_len, cfg.d_model)}

    def max_len(self, cfg) -> int | None:
        return cfg.max_seq_len

    def embed(self, model, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = start + x.shape[1]
        if T > model.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds max_seq_len={model.cfg.max_seq_len} of the "
                "learned position table; shorten the input or train with a larger max_seq_len"
            )
        return x + model.pos_embed.weight[start:T]


class Rope(Scheme):
    """Rotary embedding (rotate-half pairing, omega_p = b^(-2p/d)): only i - j enters q.k."""

    name = "rope"
    rotary = True
    inference_scale = True
    exportable = True
    params: ClassVar[dict] = {"base": 10000.0}  # b of omega_p = b^(-2p/d)

    def problems(self, cfg) -> list[str]:
        odd = [f"RoPE needs an even head dimension, got d_model/n_head = {cfg.d_head}"]
        divisible = cfg.d_model % cfg.n_head == 0  # else the config names that problem
        base = self.param(cfg, "base")
        out = odd if divisible and cfg.d_head % 2 else []
        if not (math.isfinite(base) and 1 < base <= MAX_ROPE_BASE):
            out.append(f"params.base must be > 1 and at most {MAX_ROPE_BASE:g}, got {base!r}")
        return out + self._scale_problems(cfg)

    def _scale_problems(self, cfg) -> list[str]:
        return Scheme.problems(self, cfg)  # plain RoPE trains with s = 1

    def trained_scale(self, cfg) -> float:
        """The NTK factor s the model trains with (1: none)."""
        return 1.0

    def rotated_width(self, cfg) -> int:
        """How many of a head's dimensions turn (even; d_head here). A scheme that rotates
        fewer (partial RoPE) says so here, and its frequencies and NTK exponent follow:
        omega_p = b^(-2p/r) over the r rotated dimensions, b' = b s^(r/(r-2))."""
        return cfg.d_head

    def effective_base(self, cfg, inference_scale: float) -> float | None:
        """NTK for the trained scale times the inference one: b' = b (s1 s2)^(r/(r-2))."""
        scale = self.trained_scale(cfg) * inference_scale
        return ntk_base(self.param(cfg, "base"), scale, self.rotated_width(cfg))

    def rotation(self, cfg, T: int, inference_scale: float) -> tuple | None:
        """The rotated pairs' tables, then angle 0 for pairs that do not turn."""
        r = self.rotated_width(cfg)
        cos, sin = rope_half_tables(T, r, self.effective_base(cfg, inference_scale))
        still = cfg.d_head // 2 - r // 2
        cos = torch.cat([cos, torch.ones(T, still)], dim=-1)
        sin = torch.cat([sin, torch.zeros(T, still)], dim=-1)
        return cos[:, None], sin[:, None]


class RopeNTK(Rope):
    """RoPE trained with static NTK scaling s (model.params.scale)."""

    name = "rope_ntk"
    params: ClassVar[dict] = {"base": 10000.0, "scale": 1.0}

    def _scale_problems(self, cfg) -> list[str]:
        scale = self.trained_scale(cfg)
        if not (math.isfinite(scale) and 1 <= scale <= MAX_ROPE_SCALE):
            return [f"params.scale must be >= 1 and at most {MAX_ROPE_SCALE:g}, got {scale!r}"]
        if scale != 1 and cfg.d_head <= 2:
            return [
                f"NTK scaling needs d_model/n_head >= 4 (its exponent is d/(d-2)), got {cfg.d_head}"
            ]
        return []

    def trained_scale(self, cfg) -> float:
        return self.param(cfg, "scale")


class ALiBi(Scheme):
    """Attention with linear biases (Press et al. 2022): score_ij - m_h (i - j), with the
    geometric head slopes of the paper. The bias is a function of i - j alone, so the two-way
    fit absorbs it into g(i - j) exactly; no position enters q, k or the residual stream."""

    name = "alibi"

    def score_bias(self, cfg, T: int, device) -> torch.Tensor | None:
        i = torch.arange(T, device=device)
        offset = (i[:, None] - i[None, :]).clamp(min=0).float()  # (T, T); masked pairs: 0
        slopes = alibi_slopes(cfg.n_head).to(device)
        return -slopes[:, None, None] * offset  # (H, T, T)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The paper's slopes: 2^(-8h/n) for h = 1..n when n is a power of two; otherwise those of
    the nearest lower power of two, then every other slope of the next one."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** math.floor(math.log2(n_head))
    slopes = powers(lower) + powers(2 * lower)[0::2][: n_head - lower]
    return torch.tensor(slopes, dtype=torch.float32)


SCHEMES = {s.name: s for s in (Scheme(), Learned(), Rope(), RopeNTK(), ALiBi())}
