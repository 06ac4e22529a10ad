"""Hook points: named places in the forward pass where activations can be read or replaced.

Each hook point is a module owned by the module that computes the activation, so the list of
names is derived from the model itself. A hook point's public name is its module path in the
TransformerLens habit: `layers.{l}.self_attn.hook_q` is `blocks.{l}.attn.q`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]
RENAMES = {"layers": "blocks", "self_attn": "attn"}


class HookPoint(nn.Module):
    """Identity unless hooks are registered; a hook returning a tensor replaces the activation."""

    def __init__(self):
        super().__init__()
        self.name = ""  # the public name, set by the model that owns it
        self.fns: list[HookFn] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self.name)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.dtype != x.dtype:
                    got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
                    raise TypeError(
                        f"hook {getattr(fn, '__name__', fn)!r} on {self.name} returned {got}, "
                        f"expected a {x.dtype} tensor (or None to keep the activation): "
                        "return out.to(activation.dtype)"
                    )
                if out.shape != x.shape:
                    raise ValueError(
                        f"hook on {self.name} returned shape {tuple(out.shape)}, "
                        f"expected {tuple(x.shape)}"
                    )
                x = out
        return x


def public_name(module_path: str) -> str:
    """'layers.1.self_attn.hook_pattern' -> 'blocks.1.attn.pattern'."""
    parts = [RENAMES.get(p, p) for p in module_path.split(".")]
    parts[-1] = parts[-1].removeprefix("hook_")
    return ".".join(parts)


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """{public name: hook point} in forward order, named as a side effect."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = public_name(path)
            found[module.name] = module
    return found


@contextlib.contextmanager
def attached(points: dict[str, HookPoint], hooks: Iterable[tuple[str, HookFn]]):
    """Register hooks `fn(tensor, name) -> tensor | None` on named points for the duration of
    the block; they are removed also when the block raises."""
    hooks = list(hooks)
    unknown = [name for name, _ in hooks if name not in points]
    if unknown:
        raise KeyError(f"unknown hook names {unknown}; valid names: {list(points)}")
    for name, fn in hooks:
        points[name].fns.append(fn)
    try:
        yield
    finally:
        for name, fn in hooks:
            points[name].fns.remove(fn)


def run_with_cache(model, tokens: torch.Tensor, names=None, names_filter=None, grad=False):
    """(logits, {name: activation}) of one forward pass, the activations detached. `names`: a
    list of hook names (default: every one); `names_filter` (TransformerLens's spelling): a
    list, or a function of a name that says whether to keep it. Runs under torch.no_grad()
    unless `grad` (then the logits keep their graph)."""
    chosen = list(model.hook_points) if names is None else list(names)
    if names_filter is not None:
        keep = names_filter if callable(names_filter) else set(names_filter).__contains__
        chosen = [name for name in chosen if keep(name)]
    unknown = sorted(set(chosen) - set(model.hook_points))
    if unknown:
        raise KeyError(
            f"no hook point {unknown[0]!r}; the model has: {', '.join(model.hook_points)}"
        )
    cache: dict[str, torch.Tensor] = {}

    def store(tensor: torch.Tensor, name: str) -> None:
        cache[name] = tensor.detach()

    with torch.set_grad_enabled(grad), attached(model.hook_points, [(n, store) for n in chosen]):
        logits = model(tokens)
    return logits, cache
