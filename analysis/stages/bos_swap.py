"""Measurement 5: BOS replacement (docs/science.md): the position-0 embedding is overwritten
before the forward pass (frequency-weighted mean embedding, most frequent token, a random
vector of BOS's norm, zeros), and the share of the early-query residual component that is
removed is measured (version 3: per part, key 0 and the rest, over layers >= 1), with
controls (C_mask, the original probe's transfer R^2), the probe refit on the swapped states
and the change of next-token loss."""

from __future__ import annotations

import torch

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import by_layer, removed_over_layers
from posleak.analysis.maths import content, measures
from posleak.analysis.maths.logits import PARTS
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.reports import plots
from posleak.analysis.stages._loss import record_change
from posleak.analysis.stages._removal import record_probes, record_removal
from posleak.analysis.stages.base import ATTN, RESID, RUN, Section, Stage


class BosSwap(Stage):
    def work(self, analysis) -> int:
        return len(analysis.opts.swaps) * analysis.opts.seqs * analysis.T

    def enabled(self, opts) -> bool:
        return bool(opts.swaps)

    def run(self, analysis, ctx) -> None:
        base_loss = ctx.base.losses
        k = min(analysis.opts.early_queries, analysis.T)
        everywhere = torch.ones_like(base_loss, dtype=torch.bool)
        early = everywhere.clone()
        early[:, k:] = False
        groups = {"all": everywhere, "early": early}  # early: queries i < k
        weights = bootstrap_weights(len(base_loss), analysis.opts.bootstrap, seed=7)
        for kind in analysis.opts.swaps:
            vector = replacement(analysis, kind, ctx.tokens)

            def swap(embed, name, vector=vector):
                embed = embed.clone()
                embed[:, 0] = vector.to(embed.device, embed.dtype)
                return embed

            hooks = [("embed", swap)]
            swapped = analysis.measure(ctx.tokens, hooks, fitted=ctx.fitted, targets=ctx.targets)
            for group, mask in groups.items():
                condition = {"swap": kind, "queries": group}
                change = swapped.losses - base_loss
                record_change(analysis, "bos_swap_loss_change", condition, change, mask, weights)
            record_removal(analysis, "bos_swap", {"swap": kind}, ctx.base, swapped)
            for l in range(analysis.L):
                signal = swapped.logits[l].signal.mean(-2)  # pooled over heads
                for i in range(analysis.T):
                    analysis.rec.add(
                        "c_res",
                        measures.c_res(signal[i]),
                        layer=l,
                        query=i,
                        condition={"swap": kind},
                    )
            record_probes(analysis, "bos_swap", {"swap": kind}, swapped)

    def per_layer(self, rows, opts) -> dict:
        k = opts.early_queries
        return {
            f"bos_swap_removed_{kind}_k{k}": by_layer(
                rows, "bos_swap_removed", condition={"swap": kind, "k": k}
            )
            for kind in opts.swaps
        }

    def figures(self, groups, out, opts) -> dict:
        ks = (*opts.early_k, None)
        return {"swap": plots.swap_bars(out / "bos_swap", groups, ks, opts.swaps)}

    def sections(self, opts) -> list:
        return [Section("BOS replacement", ("swap",))]


def replacement(analysis, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """The vector that replaces the position-0 embedding (science.md, measurement 5), on the
    scale the first layer sees (Gemma multiplies its embeddings by sqrt(d_model))."""
    embed = analysis.model.embed_tokens
    table = embed.weight.detach().float().cpu() * float(getattr(embed, "embed_scale", 1.0))
    body = tokens[:, 1:].flatten()
    if kind == "mean":  # frequency-weighted over the tokens that occur in the data
        counts = body.bincount(minlength=len(table)).to(table.dtype)
        return counts @ table / counts.sum()
    if kind == "token":  # the most frequent token of the analysed text
        return table[int(body.bincount().argmax())]
    first = table[tokens[:, 0]].mean(0)
    if kind == "random":
        gen = torch.Generator().manual_seed(analysis.subject.seed)
        v = torch.randn(table.shape[1], generator=gen, dtype=table.dtype)
        return v * first.norm() / v.norm()
    if kind == "zeros":
        return torch.zeros_like(first)
    raise ValueError(f"unknown BOS replacement {kind!r}; choose from mean, token, random, zeros")


STAGE = BosSwap(
    needs=("probe",),
    name="BOS replacements",
    order=40,
    metrics={
        "bos_swap_removed": ATTN,
        "bos_swap_removed_c_mask": ATTN,
        "bos_swap_probe_r2_log": RESID,
        "bos_swap_probe_refit_r2_log": RESID,
        "bos_swap_removed_v3": RUN,
        "bos_swap_removed_share": RUN,
        "bos_swap_loss_change": RUN,
    },
    numbers=(
        Reported(
            "bos_swap_removed",
            "C_res² removed by BOS→{swap}, i < {early_queries} (v2)",
            unit="share",
            conditions={"swap": "swaps"},
            compute=lambda rows, layers, opts, c: removed_over_layers(
                rows, c["swap"], opts.early_queries
            ),
        ),
        Reported(
            "bos_swap_removed_v3",
            "removed by BOS→{swap}, part {part}, i < {early_queries}, layers ≥ 1 (v3)",
            unit="share",
            conditions={"swap": "swaps", "part": PARTS},
        ),
        Reported(
            "bos_swap_loss_change",
            "loss change by BOS→{swap}, queries: {queries}",
            unit="nats",
            conditions={"swap": "swaps", "queries": ("all", "early")},
        ),
        Reported(
            "bos_swap_removed_share",
            "removed by BOS→{swap}, {part} part, i < {early_queries}, layers ≥ 1",
            unit="share",
            conditions={"swap": "swaps", "part": content.PARTS},
        ),
    ),
)
