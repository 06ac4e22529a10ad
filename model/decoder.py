"""The decoder: token embedding, pre-norm blocks (RMSNorm, attention, SwiGLU), final norm, head.

Parameter names follow the Llama layout (embed_tokens, layers.{l}.self_attn.q_proj, ...,
norm, lm_head) so that Llama-family weights map one to one. Hook points (model/hooks.py)
are modules of the layer that computes each activation; their public names follow the
TransformerLens habit of naming activations by where they sit (blocks.{l}.attn.pattern).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from posleak.files import atomic_write, safe_dir
from posleak.model.config import ModelConfig
from posleak.model.hooks import HookFn, HookPoint, attached, hook_points, run_with_cache
from posleak.model.masks import attention_mask
from posleak.model.rope import rotate

# On CPU in bf16, the materialised attention beats the SDPA kernel up to this length: training
# steps 1.11-1.15x faster at T 64-256, 0.92x at T 1024 (measured; README, Performance).
EAGER_BF16_CPU = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.force_eager = False
        d, hd = cfg.d_model, cfg.n_head * cfg.d_head
        self.q_proj = nn.Linear(d, hd, bias=False)
        self.k_proj = nn.Linear(d, hd, bias=False)
        self.v_proj = nn.Linear(d, hd, bias=False)
        self.o_proj = nn.Linear(hd, d, bias=False)
        if cfg.sink == "learned":
            self.sink_logit = nn.Parameter(torch.zeros(cfg.n_head))
        if cfg.gate:  # per head, from the query's own input: sigmoid(x W_g + b) scales its output
            self.gate_proj = nn.Linear(d, cfg.n_head)
            self.hook_gate = HookPoint()
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_scores, self.hook_pattern, self.hook_out = HookPoint(), HookPoint(), HookPoint()

    def sink_logits(self) -> torch.Tensor | None:
        """Per-head logit of the virtual zero-value key, or None without a sink."""
        if self.cfg.sink == "learned":
            return self.sink_logit
        if self.cfg.sink == "off_by_one":
            return torch.zeros(self.cfg.n_head, device=self.o_proj.weight.device)
        return None

    def forward(self, x: torch.Tensor, rope: tuple | None, visible, bias=None) -> torch.Tensor:
        """x (B, T, d); rope: the scheme's (cos, sin) tables or None; visible: the (T, T) window
        mask, or None for plain causal attention; bias: the scheme's additive score bias
        (H, T, T), or None."""
        B, T, _ = x.shape
        H, Dh = self.cfg.n_head, self.cfg.d_head
        q = self.q_proj(x).view(B, T, H, Dh)
        k = self.k_proj(x).view(B, T, H, Dh)
        if rope is not None:  # rotated in the projection's own layout: contiguous, no copies
            q, k = rotate(q, *rope), rotate(k, *rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, Dh)
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.force_eager or self.hook_scores.fns or self.hook_pattern.fns:
            y = self.eager(q, k, v, visible, bias=bias)
        elif self.cfg.attention != "softmax":  # no fused kernel: materialised, checked only
            hooked = bool(self.hook_q.fns or self.hook_k.fns)  # where a hook may put a NaN
            y = self.eager(q, k, v, visible, check=hooked, bias=bias)
        else:
            y = self.fast(q, k, v, visible, bias)
        if self.cfg.gate:
            y = self.gated(y, x)
        y = y.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, H*Dh)
        return self.hook_out(self.o_proj(y))

    def fast(self, q, k, v, visible, bias=None) -> torch.Tensor:
        """F.scaled_dot_product_attention; a sink becomes a zero key/value column with a bias.

        SDPA's CPU kernel silently zeroes NaN rows. Where a hook may have replaced q or k,
        non-finite values go to the eager path, which names the bad row; otherwise a NaN in q
        or k came from the residual stream, reaches v and the loss, and training stops on it
        (so the hook-free forward has no host-device synchronisation).
        """
        hooked = self.hook_q.fns or self.hook_k.fns
        if hooked and not torch.isfinite(q.sum() + k.sum()):
            return self.eager(q, k, v, visible, bias=bias)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[2] <= EAGER_BF16_CPU:
            return self.eager(q, k, v, visible, check=False, bias=bias)
        sink = self.sink_logits()
        if sink is None and bias is None and visible is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if sink is None and bias is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        B, H, T, Dh = q.shape
        if visible is None:
            visible = attention_mask(T, device=q.device)
        extra = 0 if sink is None else 1  # a sink is a zero key/value column with its logit
        mask = torch.zeros(H, T, T + extra, dtype=q.dtype, device=q.device)
        if bias is not None:
            mask[:, :, :T] = bias.to(q.dtype)
        mask[:, :, :T].masked_fill_(~visible, float("-inf"))
        if sink is not None:
            zeros = q.new_zeros(B, H, 1, Dh)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)  # (B, H, T+1, Dh)
            mask[:, :, T] = sink.to(q.dtype)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def eager(self, q, k, v, visible, check: bool = True, bias=None) -> torch.Tensor:
        """Materialise scores and pattern (and fire their hooks); the reference path. With
        check, a NaN attention row raises an error that names it. The scores the hooks see
        include the scheme's bias."""
        T = q.shape[2]
        if visible is None:
            visible = attention_mask(T, device=q.device)
        scores = (q / math.sqrt(self.cfg.d_head)) @ k.transpose(-2, -1)  # (B, H, T, T)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        scores.masked_fill_(~visible, float("-inf"))
        scores = self.hook_scores(scores)
        pattern = self.weights(scores)
        if check:
            self._raise_on_nan(pattern)
        pattern = self.hook_pattern(pattern)
        return pattern @ v

    def decode(self, x: torch.Tensor, past: list, rope, visible, bias) -> torch.Tensor:
        """The forward of positions start.. start + n - 1 given the keys and values of the
        positions before them (`past`: [k, v] or [], extended here). rope, visible and bias
        are the rows of those positions (n, ...) against every key so far. Generation's path,
        the materialised attention of `eager` without its q, k, v, scores and pattern hooks."""
        B, n, _ = x.shape
        H, Dh = self.cfg.n_head, self.cfg.d_head
        q = self.q_proj(x).view(B, n, H, Dh)
        k = self.k_proj(x).view(B, n, H, Dh)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, n, H, Dh).transpose(1, 2)
        if past:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        past[:] = [k, v]
        scores = (q / math.sqrt(Dh)) @ k.transpose(-2, -1)  # (B, H, n, keys)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        y = self.weights(scores.masked_fill(~visible, float("-inf"))) @ v
        if self.cfg.gate:
            y = self.gated(y, x)
        return self.o_proj(y.transpose(1, 2).reshape(B, n, H * Dh))

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Attention weights of masked scores (B, H, queries, keys): softpick, or a softmax
        over the keys and, with a sink, its virtual zero-value key."""
        sink = self.sink_logits()
        if self.cfg.attention == "softpick":
            return softpick(scores)
        if sink is None:
            return scores.softmax(dim=-1)
        column = sink.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        return torch.cat([scores, column], dim=-1).softmax(dim=-1)[..., :-1]

    def gated(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each head's output (B, H, T, d_head) scaled by sigmoid(x W_g + b_g) of its query."""
        gate = self.hook_gate(torch.sigmoid(self.gate_proj(x)))  # (B, T, H)
        return y * gate.transpose(1, 2).unsqueeze(-1).to(y.dtype)

    def _raise_on_nan(self, pattern: torch.Tensor) -> None:
        bad = pattern.sum(-1).isnan()  # (B, H, T): a row with a NaN sums to NaN
        if bad.any():
            b, h, i = (int(t) for t in bad.nonzero()[0])
            raise FloatingPointError(
                f"NaN attention row at layer {self.layer}, head {h}, query {i} (batch row {b}); "
                "check the scores at that row (all keys masked, or NaN/inf in q or k)"
            )


def softpick(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Softpick over the last dimension: ReLU(e^x - 1) / (sum_j |e^x_j - 1| + eps), masked keys
    (-inf) left out. Computed with numerator and denominator times e^-m, m = max(row max, 0),
    so that nothing overflows; a row may sum to less than 1 (attention to nothing). In at
    least float32, as autocast computes a softmax: e^x - 1 cancels near x = 0."""
    x = scores.float() if scores.element_size() < 4 else scores
    m = x.amax(-1, keepdim=True).clamp_min(0)
    floor = torch.exp(-m)
    shifted = (torch.exp(x - m) - floor).masked_fill(x == float("-inf"), 0.0)
    weights = shifted.clamp_min(0) / (shifted.abs().sum(-1, keepdim=True) + eps * floor)
    return weights.to(scores.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_width, bias=False)
        self.down_proj = nn.Linear(cfg.ff_width, cfg.d_model, bias=False)
        self.hook_out = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_out(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.hook_resid_mid = HookPoint()
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_post = HookPoint()

    def decode(self, x: torch.Tensor, past: list, rope, visible, bias) -> torch.Tensor:
        """forward for the newest positions, given the attention's past keys and values."""
        x = x + self.self_attn.decode(self.input_layernorm(x), past, rope, visible, bias)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, rope, visible, bias=None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attended = self.self_attn(self.input_layernorm(x), rope, visible, bias)
        x = self.hook_resid_mid(x + attended)
        return self.hook_resid_post(x + self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """Decoder-only transformer with a pluggable positional scheme and named hook points."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.rope_inference_scale = 1.0  # NTK scale applied on top of the trained one
        self._positional_cache: dict = {}
        self.scheme = cfg.scheme  # model/positions.py: how position enters this model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()
        scheme_modules = self.scheme.build(cfg)
        for name, module in scheme_modules.items():
            self.add_module(name, module)
        self.scheme_modules = tuple(scheme_modules)  # their names (pos_embed for `learned`)
        self.layers = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hook_final = HookPoint()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.hook_points = hook_points(self)
        self.init_weights(seed)

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise each parameter from its own generator, keyed by (seed, parameter name).

        A parameter's initial value therefore depends only on the seed and its name: two
        variants that share a parameter start it identically, and adding a position table
        shifts nothing else.
        """
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                param.fill_(1.0)
            elif name.endswith("sink_logit"):
                param.zero_()
            else:
                std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                gen = torch.Generator().manual_seed(_name_seed(seed, name))
                param.copy_(torch.randn(param.shape, generator=gen) * std)

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, V)."""
        return self.logits_of(self.hidden(tokens))

    def logits_of(self, final: torch.Tensor) -> torch.Tensor:
        """The output projection of final states (..., d) -> logits (..., V)."""
        return self.lm_head(final)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> the final normalised states (B, T, d): the forward pass without
        the output projection, for passes that read activations and need no logits."""
        try:  # checked only when the lookup fails: the forward reads nothing back to the host
            embedded = self.embed_tokens(tokens)
        except IndexError:
            raise ValueError(
                f"token ids must be in [0, {self.cfg.vocab_size}) for this model's vocabulary, "
                f"got ids from {int(tokens.min())} to {int(tokens.max())}: encode with the "
                "model's own tokenizer"
            ) from None
        x = self.scheme.embed(self, self.hook_embed(embedded))  # (B, T, d)
        return self.hidden_from(x, 0)

    def hidden_from(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The final normalised states (B, T, d) from `x`, the input of block `layer` (its
        resid_pre): the forward pass from that block on, the same arithmetic as `hidden`.
        An analysis that changes nothing before `layer` starts there from states it kept."""
        T = x.shape[1]
        rope, bias = self._positional(T, x.device)
        windowed = self.cfg.window is not None and self.cfg.window < T
        visible = attention_mask(T, self.cfg.window, x.device) if windowed else None
        for block in self.layers[layer:]:
            x = block(x, rope, visible, bias)
        return self.hook_final(self.norm(x))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: list[list]) -> torch.Tensor:
        """Logits (B, n, V) of `tokens` (B, n) appended to the sequence whose keys and values
        `cache` holds (one [k, v] per layer; start with [[] for each layer]), which it then
        holds too: generation without recomputing the prefix. The same numbers as `forward`
        on the whole sequence, to float rounding (tests/test_model.py); it is not for hooks."""
        start = cache[0][0].shape[2] if cache[0] else 0
        T = start + tokens.shape[1]
        x = self.scheme.embed(self, self.embed_tokens(tokens), start)
        rope, bias = self._positional(T, tokens.device)
        rope = None if rope is None else tuple(t[start:T] for t in rope)
        bias = None if bias is None else bias[:, start:T, :T]
        visible = attention_mask(T, self.cfg.window, tokens.device)[start:T]
        for block, past in zip(self.layers, cache, strict=True):
            x = block.decode(x, past, rope, visible, bias)
        return self.logits_of(self.norm(x))

    @property
    def rope_effective_base(self) -> float | None:
        """The base the frequency table uses now: NTK for the trained scale times the
        inference scale (b' = b * (s_train * s_inf)^(d/(d-2))); None without RoPE."""
        return self.scheme.effective_base(self.cfg, self.rope_inference_scale)

    def _positional(self, T: int, device) -> tuple:
        """The scheme's rotation tables and score bias at length T (cached per length)."""
        key = (T, str(device), self.rope_inference_scale)
        if key not in self._positional_cache:
            rope = self.scheme.rotation(self.cfg, T, self.rope_inference_scale)
            rope = None if rope is None else tuple(t.to(device) for t in rope)
            self._positional_cache = {key: (rope, self.scheme.score_bias(self.cfg, T, device))}
        return self._positional_cache[key]

    def set_rope_scale(self, scale: float) -> None:
        """Run a trained RoPE model with static NTK scaling s at inference (1 = as trained).

        The scale composes with a trained NTK scale s1: the base becomes that of s1 * s.
        """
        if not self.scheme.inference_scale:
            raise ValueError(
                f"set_rope_scale needs a RoPE model, this one is {self.cfg.position!r}"
            )
        if not scale >= 1:
            raise ValueError(f"rope scale must be >= 1, got {scale!r}")
        self.rope_inference_scale = float(scale)

    # ---------------------------------------------------------------- hooks
    def hook_names(self) -> list[str]:
        """Every hook point's public name, in the order the forward pass reaches them."""
        return list(self.hook_points)

    @property
    def force_eager(self) -> bool:
        """Materialise scores and patterns in every layer (the reference path)."""
        return all(block.self_attn.force_eager for block in self.layers)

    @force_eager.setter
    def force_eager(self, value: bool) -> None:
        for block in self.layers:
            block.self_attn.force_eager = bool(value)

    @contextlib.contextmanager
    def hooks(self, hooks: Iterable[tuple[str, HookFn]]):
        """Register hooks `fn(tensor, name) -> tensor | None` for the duration of the block.

        A returned tensor replaces the activation (an intervention). Hooks are always removed,
        also when the block raises.
        """
        with attached(self.hook_points, hooks):
            yield self

    def output_projection(self, layer: int) -> torch.Tensor:
        """W_O of an attention layer, (d_model, n_head * d_head): head h owns columns h*d_h.."""
        return self.layers[layer].self_attn.o_proj.weight

    def run_with_cache(self, tokens: torch.Tensor, names=None, names_filter=None, grad=False):
        """Forward pass that also returns {name: detached activation} (model/hooks.py)."""
        return run_with_cache(self, tokens, names, names_filter, grad)

    # ---------------------------------------------------------------- persistence
    # One format for a model, here and inside every training checkpoint: model.safetensors
    # (tied weights stored once) and config.json (the ModelConfig and the inference scale).
    def config_json(self) -> str:
        return (
            json.dumps(
                {**self.cfg.to_dict(), "rope_inference_scale": self.rope_inference_scale}, indent=2
            )
            + "\n"
        )

    def weights(self) -> dict[str, torch.Tensor]:
        """State dict on CPU without duplicates of tied weights (safetensors refuses them)."""
        out, seen = {}, set()
        for name, tensor in self.state_dict().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                out[name] = tensor.detach().cpu().contiguous()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if self.cfg.tie_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"weights do not fit this model: missing {sorted(set(missing) - tied)}, "
                f"unexpected {sorted(unexpected)}"
            )

    def save(self, directory: str | Path) -> None:
        """Write model.safetensors and config.json (no pickle)."""
        directory = safe_dir(directory, "model folder")
        atomic_write(directory / "model.safetensors", safetensors_bytes(self.weights()))
        atomic_write(directory / "config.json", self.config_json())

    @classmethod
    def load(cls, directory: str | Path, device="cpu") -> Decoder:
        """A model saved by `save`, or the model of a training checkpoint folder."""
        directory = Path(directory)
        values = json.loads((directory / "config.json").read_text())
        scale = values.pop("rope_inference_scale", 1.0)
        model = cls(ModelConfig.from_dict(values))
        model.load_weights(load_file(str(directory / "model.safetensors"), device=str(device)))
        if scale != 1.0:
            model.set_rope_scale(scale)
        return model.eval()

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed_tokens.weight.numel()
            for name in self.scheme_modules:
                total -= sum(p.numel() for p in getattr(self, name).parameters())
        return total


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
