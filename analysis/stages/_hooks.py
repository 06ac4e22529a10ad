"""Attention-pattern hooks that apply one rule (a knockout, the route-2 test) to some heads."""

from __future__ import annotations


def on_heads(rule, heads: list[int] | None = None):
    """A pattern hook applying rule(pattern) to the given heads of every sequence (None:
    every head), the other heads untouched."""

    def hook(pattern, name):
        if heads is None:
            return rule(pattern)
        out = pattern.clone()
        out[:, heads] = rule(pattern[:, heads])
        return out

    return hook
