"""Measurement 7: the shift test (docs/science.md): the same content at offset 1 and at offset
1 + delta after a fixed filler; the Jensen-Shannon distance between attention rows of
matching queries over the content keys only. Purely relative logits give exactly zero."""

from __future__ import annotations

import torch

from posleak.analysis.engine.collect import store, stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import ANY
from posleak.analysis.maths import measures
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import ATTN, Bench, Context, Section, Stage


class Shift(Stage):
    def work(self, analysis: Bench) -> int:
        return analysis.opts.shift_seqs * (analysis.T // 2 + 1 + analysis.T)

    def run(self, analysis: Bench, ctx: Context) -> None:
        T, H, L = analysis.T, analysis.H, analysis.L
        n = T // 2
        delta = T - n - 1
        seqs = analysis.tokens(analysis.opts.shift_seqs, T, "shift")
        filler = analysis.tokens(1, T, "filler")[0, 1 : 1 + delta]
        first, content = seqs[:, :1], seqs[:, 1 : 1 + n]
        near = torch.cat([first, content], dim=1)
        far = torch.cat([first, filler.expand(len(seqs), -1), content], dim=1)
        blocks = [torch.empty(len(seqs), H, n, n) for _ in range(L)]
        consumers = {
            f"blocks.{l}.attn.pattern": store(blocks[l], _content_block(1, n)) for l in range(L)
        }
        stream(analysis.model, near, consumers, analysis.batch)
        dists = [torch.empty(len(seqs), H, n) for _ in range(L)]
        consumers = {
            f"blocks.{l}.attn.pattern": _scorer(blocks[l], dists[l], 1 + delta, n) for l in range(L)
        }
        stream(analysis.model, far, consumers, analysis.batch)
        add = analysis.rec.add
        for l, d in enumerate(dists):
            for m in range(n):
                add(
                    "shift_js",
                    d[:, :, m].mean(),
                    layer=l,
                    query=m,
                    std=d[:, :, m].mean(1).std(),
                    n=len(d),
                )
            for h in range(H):
                add("shift_js", d[:, h].mean(), layer=l, head=h)
            add("shift_js", d.mean(), layer=l, condition={"delta": delta})

    def per_layer(self, rows, opts) -> dict:
        return {
            "shift_js": {
                r["layer"]: r["value"] for r in rows if r["metric"] == "shift_js" and r["condition"]
            }
        }

    def figures(self, groups, out, opts) -> dict:
        def draw(ax):
            plots.layer_curve(
                ax,
                groups,
                "shift_js",
                "JS distance",
                "Shift test, content keys only",
                query=None,
                condition=ANY,  # the layer's pooled value records its shift {"delta": Δ}
            )

        return {"shift": plots.figure(out / "shift", draw)}

    def sections(self, opts) -> list:
        return [Section("Shift test", ("shift",))]


def _content_block(start: int, n: int):
    return lambda pattern: pattern[..., start : start + n, start : start + n]


def _scorer(near_blocks, out, start_far: int, n: int):
    def consume(pattern, rows):
        far_block = pattern[..., start_far : start_far + n, start_far : start_far + n]
        out[rows] = measures.shift_distances(near_blocks[rows], far_block, 0, 0, n).float()

    return consume


STAGE = Shift(
    name="shift test",
    order=70,
    metrics={"shift_js": ATTN},
    numbers=(
        Reported(
            "shift_js", "shift-test JS distance (mean over layers)", curve="shift_js", reduce="mean"
        ),
    ),
)
