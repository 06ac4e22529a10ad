"""ModelConfig: every architectural choice of the decoder, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from posleak.model.positions import SCHEMES

SINKS = ("none", "learned", "off_by_one")
NORMALISERS = ("softmax", "softpick")  # how a row of scores becomes attention weights
MAX_WIDTH = 1 << 14  # d_model and n_layer: beyond this a typo, not a plan
LIMITS = {  # beyond these a typo, not a plan (each far above any model posleak trains)
    "d_model": MAX_WIDTH,
    "n_layer": MAX_WIDTH,
    "vocab_size": 1 << 22,
    "d_ff": 1 << 18,
    "max_seq_len": 1 << 20,
}


def _is_int(value) -> bool:
    """An integer, and not a bool (True is an int to Python, never a layer count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ConfigError(ValueError):
    """A configuration that cannot be built; the message lists every problem found."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 259
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to 32
    max_seq_len: int = 1024  # only bounds the `learned` position table
    position: str = "rope"
    window: int | None = None  # sliding window: w keys including self; None = full causal
    sink: str = "none"
    attention: str = "softmax"  # or "softpick": weights need not sum to 1 (no sink needed)
    gate: bool = False  # a query-dependent head-wise sigmoid gate on the attention output
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    params: dict = field(default_factory=dict)  # the scheme's own ([model.params]; positions.py)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid model config:\n  - " + "\n  - ".join(problems))
        object.__setattr__(self, "params", self.scheme.own_params(self.params))

    @classmethod
    def problems_of(cls, values: dict) -> list[str]:
        """problems() of the config these values (spelled as on disk) would make, without
        raising."""
        values = spelled_none(values)
        unvalidated = object.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            object.__setattr__(unvalidated, f.name, values.get(f.name, default))
        return unvalidated.problems()

    def problems(self) -> list[str]:
        """Every reason this config is impossible, each naming the field and the fix."""
        out = []
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if not _is_real(self.norm_eps):
            out.append(f"norm_eps must be a number, got {self.norm_eps!r}")
        for name in ("tie_embeddings", "gate"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if out:
            return out
        if self.position not in SCHEMES:
            out.append(f"position must be one of {tuple(SCHEMES)}, got {self.position!r}")
        elif not isinstance(self.params, dict):
            out.append(f"params must be a table of the scheme's parameters, got {self.params!r}")
        else:
            out += self.scheme.param_problems(self.params)
        if self.sink not in SINKS:
            out.append(f"sink must be one of {SINKS}, got {self.sink!r}")
        if self.attention not in NORMALISERS:
            out.append(f"attention must be one of {NORMALISERS}, got {self.attention!r}")
        elif self.attention == "softpick" and self.sink != "none":
            out.append(
                f"sink={self.sink!r} is a softmax's way to attend to nothing; softpick needs "
                'none (its weights need not sum to 1): set sink = "none"'
            )
        if self.d_model % self.n_head:
            out.append(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                "pick n_head among the divisors of d_model"
            )
        if self.window is not None and (not _is_int(self.window) or self.window < 1):
            out.append(
                f"window must be a positive integer or None (full causal), got {self.window!r}"
            )
        if self.d_ff is not None and (not _is_int(self.d_ff) or self.d_ff < 1):
            out.append(f"d_ff must be a positive integer or None, got {self.d_ff!r}")
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if _is_real(value) and value > limit:
                out.append(f"{name}={value} is beyond what posleak builds (at most {limit})")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            out.append(f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if (  # the scheme's own checks read its parameters: only once they are well-formed
            self.position in SCHEMES
            and isinstance(self.params, dict)
            and not self.scheme.param_problems(self.params)
        ):
            out += self.scheme.problems(self)
        return out

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_width(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-8 * self.d_model // 3 // 32) * 32

    @property
    def scheme(self):
        """The positional scheme object (model/positions.py) this config names."""
        return SCHEMES[self.position]

    @property
    def rope_effective_base(self) -> float | None:
        """The base the frequency table uses: b for `rope`, the NTK base b' for `rope_ntk`."""
        return self.scheme.effective_base(self, 1.0)

    def to_dict(self) -> dict:
        """The one spelling on disk, in a config.toml's [model] table and a checkpoint's
        config.json alike: "none" is 0 (TOML has no null), and a scheme without parameters
        writes no params."""
        out = dataclasses.asdict(self)
        for key in ZERO_IS_NONE:
            out[key] = out[key] or 0
        if not out["params"]:
            del out["params"]
        return out

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """The config to_dict wrote, or one written before: "none" as null, RoPE's base and
        scale as the fields rope_base and rope_scale."""
        values = upgraded(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**spelled_none(values))


ZERO_IS_NONE = ("window", "d_ff")  # on disk 0 means None: no window, the default FFN width
MOVED = {"rope_base": "base", "rope_scale": "scale"}  # fields that became RoPE's own params


def upgraded(values: dict) -> dict:
    """[model] as written before RoPE's base and scale moved into [model.params] (config.toml
    and config.json of older runs), as written now: the one-version reader."""
    if not set(MOVED) & set(values):
        return values
    out = {k: v for k, v in values.items() if k not in MOVED}
    moved = {MOVED[k]: v for k, v in values.items() if k in MOVED}
    out["params"] = {**moved, **(values.get("params") or {})}
    return out


def spelled_none(values: dict) -> dict:
    """Field values from the disk spelling: an integer 0 (or null) in ZERO_IS_NONE is None."""
    out = dict(values)
    for key in ZERO_IS_NONE:
        value = out.get(key)
        if key in out and (value is None or (_is_int(value) and value == 0)):
            out[key] = None
    return out
