"""Measurement 2: the mean-logit decomposition per layer and head (docs/science.md).

The base pass sums each block of sequences' pre-softmax logits; the two-way fit
M_ij ~ g(i - j) + a(i) of the split halves gives C_res (the residual-stream component, from
the split-half product of residues), abs_share, C_mask (the causal-mask component) and the
offset profile g. A second pass over a subsample measures the content variation c_content."""

from __future__ import annotations

import math

import torch

from posleak.analysis.engine.collect import stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import (
    by_layer,
    early_square_sum,
    finite_mean,
    per_layer_queries,
)
from posleak.analysis.maths import content, measures
from posleak.analysis.maths.logits import PARTS, local_fit, parts, pooled
from posleak.analysis.maths.stats import percentile_interval
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import ATTN, RUN, Bench, Context, Section, Stage


class MeanLogits(Stage):
    def work(self, analysis: Bench) -> int:
        return min(analysis.opts.content_seqs, analysis.opts.seqs) * analysis.T

    def run(self, analysis: Bench, ctx: Context) -> None:
        add = analysis.rec.add
        deviation = content_deviation(analysis, ctx.tokens, ctx.base)
        for l, st in enumerate(ctx.base.logits):
            record_signal(analysis, l, st.signal, st.signal_boot, None)
            for h in range(analysis.H):
                record_signal(analysis, l, st.signal[h], st.signal_boot[:, h], h)
                add("abs_share", st.abs_share[h], layer=l, head=h)
                for i in range(analysis.T):
                    add("c_mask", st.c_mask[h, i], layer=l, head=h, query=i)
                    add("g_rel", st.g[h, i] - st.g[h, 0], layer=l, head=h, query=i)
            add("abs_share", st.share_num.sum() / st.share_den.sum(), layer=l)
            for i in range(analysis.T):
                add("c_mask", st.c_mask[:, i].mean(), layer=l, query=i)
                add("c_content", deviation[l][i], layer=l, query=i)
            record_parts(analysis, l, st)
            record_parts(analysis, l, local_fit(analysis, ctx.base.sums[l]), "c_res_local")
        record_deep(analysis, ctx)
        record_split(analysis, ctx)

    def per_layer(self, rows, opts) -> dict:
        return {
            "abs_share": by_layer(rows, "abs_share"),
            "c_res_early": early_rms(rows, opts),
            "c_content": query_means(rows, "c_content"),
            "c_mask": query_means(rows, "c_mask"),
        }

    def figures(self, groups, out, opts) -> dict:
        per_query = plots.per_layer_queries
        return {
            "c_mask_q": per_query(out / "c_mask_query", groups, "c_mask", "mask component"),
            "c_res_q": per_query(out / "c_res_query", groups, "c_res", "residual component"),
            "c_content_q": per_query(
                out / "c_content_query", groups, "c_content", "content variation"
            ),
            "abs_share": plots.head_maps(out / "abs_share", groups, "abs_share", "absolute share"),
            "c_res_l": plots.figure(
                out / "c_res_layer",
                lambda ax: plots.layer_curve(
                    ax,
                    groups,
                    "c_res",
                    "residual component",
                    "C_res vs layer, mean over queries",
                    condition=None,
                ),
            ),
        }

    def sections(self, opts) -> list:
        return [
            Section("Causal-mask component C_mask(i) = log Σ_j exp ĝ(i−j) − ĝ(0)", ("c_mask_q",)),
            Section(
                "Residual-stream component C_res(i) (split-half, noise-free in expectation)",
                ("c_res_q", "c_res_l"),
            ),
            Section(
                "Content variation c_content(i) = mean |s_ij − M_ij| (read C_res against it)",
                ("c_content_q",),
            ),
            Section(
                "Share of systematic logit structure not a function of i − j (abs_share)",
                ("abs_share",),
            ),
        ]


def early_rms(rows, opts) -> dict:
    """{layer: root mean square of C_res(i) over the early queries 1 <= i < K} (version 2)."""
    k = opts.early_queries
    c_res = per_layer_queries(rows, "c_res")
    return {l: math.sqrt(early_square_sum(c, k) / (k - 1)) for l, c in c_res.items()}


def query_means(rows, metric: str) -> dict:
    """{layer: mean over queries} of a per-query metric pooled over heads."""
    return {l: finite_mean(c.values()) for l, c in per_layer_queries(rows, metric).items()}


def record_signal(analysis, layer: int, signal, boot, head) -> None:
    """C_res(i) with its bootstrap interval, and the signed mean square with its SE."""
    if head is None:
        signal, boot = pooled(signal), pooled(boot)
    lo, hi = percentile_interval(boot)
    se = boot.std(0)
    add, n = analysis.rec.add, analysis.opts.seqs
    for i in range(analysis.T):
        add(
            "c_res",
            measures.c_res(signal[i]),
            layer=layer,
            head=head,
            query=i,
            lo=measures.c_res(lo[i]),
            hi=measures.c_res(hi[i]),
            n=n,
        )
        add("c_res_signal", signal[i], layer=layer, head=head, query=i, std=se[i], n=n)


def record_parts(analysis, layer: int, st, prefix: str = "c_res_early") -> None:
    """Version 3, items 1 and 2: C_res split into the key-0 column and the rest, per query
    (clamped: for plots; from the full fit only) and at early queries as one aggregate,
    summed signed and clamped once, with its bootstrap SE and the no-signal floor of this N
    (balanced sign flips of half B). `prefix` names the aggregate's metrics: c_res_early
    (the fit over every query, as in version 2) or c_res_local (the fit on i < K_fit)."""
    add, k = analysis.rec.add, min(analysis.opts.early_queries, analysis.T)
    for part, (signed, boot, null) in parts(st).items():
        cond = {"part": part}
        mean, boot_mean = signed[1:k].mean(), boot[:, 1:k].mean(-1)
        lo, hi = percentile_interval(boot_mean)
        se, n = boot_mean.std(), analysis.opts.seqs
        add(f"{prefix}_signed", mean, layer=layer, condition=cond, std=se, lo=lo, hi=hi, n=n)
        low, high = measures.clamp_once(lo), measures.clamp_once(hi)
        value = measures.clamp_once(mean)
        add(f"{prefix}_v3", value, layer=layer, condition=cond, lo=low, hi=high)
        floor = torch.quantile(measures.clamp_once(null[:, 1:k].mean(-1)), 0.95)
        add(f"{prefix}_floor", floor, layer=layer, condition=cond, n=n)


def record_deep(analysis, ctx) -> None:
    """The headline of version 3's early-query C_res: the local fit's signed early means
    averaged over layers >= 1, then clamped once, with bootstrap interval and the no-signal
    floor of this N (the same sign flips in every layer), per part."""
    if analysis.L < 2:
        return
    k, n = min(analysis.opts.early_queries, analysis.T), analysis.opts.seqs
    per_layer = [parts(local_fit(analysis, ctx.base.sums[l])) for l in range(1, analysis.L)]
    for part in PARTS:
        signed, boot, null = (
            torch.stack([p[part][index][..., 1:k].mean(-1) for p in per_layer]).mean(0)
            for index in range(3)
        )
        lo, hi = percentile_interval(boot)
        clamp, cond = measures.clamp_once, {"part": part}
        add = analysis.rec.add
        add("c_res_deep", clamp(signed), condition=cond, lo=clamp(lo), hi=clamp(hi), n=n)
        add("c_res_deep_floor", torch.quantile(clamp(null), 0.95), condition=cond, n=n)


def record_split(analysis, ctx) -> None:
    """Version 4: the early-query signal of the content keys (a fit on keys j >= 1) and of key 0
    read against it (the BOS offset's variation), signed, per layer and averaged over layers
    >= 1 (layer 0's key-0 logit is the embedding's own), each with its bootstrap SE and
    interval and the floor of both halves' sign flips; and the BOS offset's mean over the
    early queries, BOS's token identity."""
    add, n, k = analysis.rec.add, analysis.opts.seqs, min(analysis.opts.early_queries, analysis.T)
    splits = [content.local_split(analysis, sums) for sums in ctx.base.sums]
    for part in content.PARTS:
        by_layer_ = [content.parts_of(split)[part] for split in splits]
        mask = splits[0].offset_queries if part == "key0" else None
        groups = [(l, [p]) for l, p in enumerate(by_layer_)]
        if analysis.L >= 2:
            groups.append((None, by_layer_[1:]))
        for layer, chosen in groups:
            found = content.early_aggregate(chosen, k, mask)
            add(f"c_res_{part}", found.value, layer=layer, std=found.se, lo=found.lo,
                hi=found.hi, n=n)  # fmt: skip
            add(f"c_res_{part}_floor", found.floor, layer=layer, n=n)
    for l, split in enumerate(splits):
        offset = split.bos_offset[:, split.offset_queries].mean(-1)  # (H,)
        for h in range(analysis.H):
            add("bos_offset_mean", offset[h], layer=l, head=h, n=n)
        add("bos_offset_mean", offset.mean(), layer=l, n=n)


def content_deviation(analysis, tokens: torch.Tensor, base) -> list[torch.Tensor]:
    """c_content(i) per layer: mean over sequences and visible j of |s_ij - M_ij|, pooled
    over heads. M must be known first, so this is a second pass, over the first
    `content_seqs` sequences (a subsample of the mean over sequences)."""
    tokens = tokens[: analysis.opts.content_seqs]
    totals = [torch.zeros(analysis.H, analysis.T, dtype=torch.float64) for _ in range(analysis.L)]

    def consumer(l):
        def add(scores, rows):
            mean = base.logits[l].mean
            totals[l] += measures.content_deviation(scores, mean, analysis.design(l)).sum(0)

        return add

    consumers = {f"blocks.{l}.attn.scores": consumer(l) for l in range(analysis.L)}
    stream(analysis.model, tokens, consumers, analysis.batch)
    return [(t / (analysis.design(l).rows * len(tokens))).mean(0) for l, t in enumerate(totals)]


STAGE = MeanLogits(
    name="mean logits",
    title="The mean-logit decomposition: C_mask, C_res, content variation",
    order=20,
    metrics={
        m: ATTN
        for m in (
            "c_res",
            "c_res_signal",
            "abs_share",
            "c_mask",
            "g_rel",
            "c_content",
            "c_res_content",
            "c_res_content_floor",
            "c_res_key0",
            "c_res_key0_floor",
            "bos_offset_mean",
            "c_res_early_signed",
            "c_res_early_v3",
            "c_res_early_floor",
            "c_res_local_signed",
            "c_res_local_v3",
            "c_res_local_floor",
        )
    }
    | {"c_res_deep": RUN, "c_res_deep_floor": RUN},
    numbers=(
        Reported(
            "c_res_early",
            "C_res at queries 1–{early_last} (mean over layers)",
            curve="c_res_early",
            reduce="mean",
        ),
        Reported(
            "c_content",
            "c_content: content variation of logits (mean over layers)",
            curve="c_content",
            reduce="mean",
        ),
        Reported("abs_share", "abs_share (mean over layers)", reduce="mean"),
        Reported(
            "c_res_deep",
            "C_res v3, part {part}, queries 1–{early_last}, layers ≥ 1 (fit on i < "
            "{fit_queries}, signed, clamped once)",
            conditions={"part": PARTS},
        ),
        Reported(
            "c_res_deep_floor",
            "its no-signal floor at this N, part {part}",
            conditions={"part": PARTS},
        ),
        Reported(
            "c_res_content",
            "C²_content: position in the content keys (fit on keys j ≥ 1), queries "
            "1–{early_last}, layers ≥ 1, signed",
        ),
        Reported("c_res_content_floor", "its no-signal floor (both halves sign-flipped)"),
        Reported(
            "c_res_key0",
            "C²_key0: key 0 read against the content fit, queries 1–{early_last}, layers ≥ 1, "
            "signed",
        ),
        Reported("c_res_key0_floor", "its no-signal floor (both halves sign-flipped)"),
        Reported(
            "bos_offset_mean",
            "BOS offset b̄: key 0's logit above the content fit (mean over layers ≥ 1)",
            reduce="mean_from_1",
        ),
    ),
)
