"""Pictures of attention: the mean pattern A_ij at the early queries of the heads that read
key 0 most (the top `top_heads` by λ₀), what an interpretability reader opens first. Recorded
as numbers (one row per query and key), so that the figure, like every other, is drawn from
records."""

from __future__ import annotations

import torch

from posleak.analysis.engine.collect import stream
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import ATTN, Bench, Context, Section, Stage
from posleak.analysis.stages.route2 import top_heads


class AttentionMaps(Stage):
    def work(self, analysis: Bench) -> int:
        return min(analysis.opts.content_seqs, analysis.opts.seqs) * analysis.T

    def run(self, analysis: Bench, ctx: Context) -> None:
        k = min(analysis.opts.early_queries, analysis.T)
        tokens = ctx.tokens[: analysis.opts.content_seqs]
        heads = top_heads(analysis, ctx)
        sums = {(l, h): torch.zeros(k, k, dtype=torch.float64) for l, h, _ in heads}

        def consumer(layer: int):
            def consume(pattern, rows):
                for (l, h), total in sums.items():
                    if l == layer:
                        total += pattern[:, h, :k, :k].double().sum(0)

            return consume

        layers = sorted({l for l, _, _ in heads})
        stream(
            analysis.model,
            tokens,
            {f"blocks.{l}.attn.pattern": consumer(l) for l in layers},
            analysis.batch,
        )
        for (l, h), total in sums.items():
            mean = total / len(tokens)
            for i in range(k):
                for j in range(i + 1):
                    analysis.rec.add(
                        "attention_early",
                        mean[i, j],
                        layer=l,
                        head=h,
                        query=i,
                        condition={"key": j},
                    )

    def figures(self, groups, out, opts) -> dict:
        return {"attention": plots.attention_maps(out / "attention", groups)}

    def sections(self, opts) -> list:
        return [Section("Attention of the heads that read key 0 most", ("attention",))]


STAGE = AttentionMaps(
    name="attention maps",
    order=32,
    metrics={"attention_early": ATTN},
)
