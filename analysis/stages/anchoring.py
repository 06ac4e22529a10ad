"""Measurement 5 of version 4: anchoring. BOS is put at position k (k ordinary tokens before
it, k in `anchor_positions`) and every head's lift on key k, where BOS now sits, is read beside
its lift on key 0: a token-anchored sink follows BOS to key k, a position-anchored one stays on
key 0 (docs/science.md). The lift is the key-0 lift's definition moved to key k: the mean over
the queries that see key k of n_i A_ik (1 for uniform attention)."""

from __future__ import annotations

import torch

from posleak.analysis.engine.collect import each, store, stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.maths import measures
from posleak.analysis.stages.base import ATTN, Bench, Context, Stage

KEYS = ("bos", "start")  # the lift on key k (BOS) and on key 0 (whatever token starts the row)


class Anchoring(Stage):
    def enabled(self, opts) -> bool:
        return bool(opts.anchor_positions)

    def work(self, analysis: Bench) -> int:
        return len(analysis.opts.anchor_positions) * analysis.opts.anchor_seqs * analysis.T

    def run(self, analysis: Bench, ctx: Context) -> None:
        if "always" not in analysis.subject.bos_policies:  # a tokenizer without a BOS token
            return
        n, T = analysis.opts.anchor_seqs, analysis.T
        bos = analysis.tokens(1, T, "anchoring-bos", "always")[0, 0]
        ordinary = analysis.tokens(n, T, "anchoring", "never")[:, :T]
        for k in analysis.opts.anchor_positions:
            if k >= T - 1:
                continue
            tokens = bos_at(ordinary, bos, k)
            columns = {key: [torch.empty(n, analysis.H, T) for _ in range(analysis.L)]
                       for key in {k, 0}}  # fmt: skip
            consumers = {
                f"blocks.{l}.attn.pattern": each(
                    [store(columns[key][l], lambda p, key=key: p[..., key]) for key in columns]
                )
                for l in range(analysis.L)
            }
            stream(analysis.model, tokens, consumers, analysis.batch)
            for l in range(analysis.L):
                window = analysis.windows[l]
                for key, at in (("bos", k), ("start", 0)):
                    lift = measures.key_lift(columns[at][l], at, window).mean(0)  # (H,)
                    for h in range(analysis.H):
                        analysis.rec.add(
                            "anchor_lift", lift[h], layer=l, head=h, condition={"k": k, "key": key}
                        )


def bos_at(ordinary: torch.Tensor, bos, k: int) -> torch.Tensor:
    """(n, T) sequences with k ordinary tokens, then BOS at position k, then ordinary ones."""
    T = ordinary.shape[1]
    column = torch.full((len(ordinary), 1), int(bos), dtype=ordinary.dtype)
    return torch.cat([ordinary[:, :k], column, ordinary[:, k : T - 1]], dim=1)


def strongest(rows: list[dict], opts, condition: dict) -> float | None:
    """The largest lift over heads and layers on one key at one k."""
    values = [
        r["value"]
        for r in rows
        if r["metric"] == "anchor_lift" and r["condition"] == condition and r["value"] is not None
    ]
    return max(values, default=None)


STAGE = Anchoring(
    name="anchoring",
    order=36,
    metrics={"anchor_lift": ATTN},
    numbers=(
        Reported(
            "anchor_lift_max",
            "λ on {key} with BOS at position {k}, strongest head",
            conditions={"k": "anchor_positions", "key": KEYS},
            compute=lambda rows, layers, opts, condition: strongest(rows, opts, condition),
        ),
    ),
)
