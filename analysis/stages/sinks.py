"""Measurement 3: sinks per layer and head (docs/science.md): alpha_0, the mean attention on
key 0 over the queries that can see it, read from the base pass's key-0 column, beside its
uniform baseline (the mean of 1/n_i); the key-0 lift lambda_0 (n_i A_i0 averaged: 1 for
uniform attention), and the version-3 sink heads, alpha_0 > eps and lambda_0 >= lift; the
early profile A_i0 for every head; A_i0 against i for sink heads (alpha_0 > eps)."""

from __future__ import annotations

from collections import defaultdict

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import finite_mean
from posleak.analysis.maths import measures
from posleak.analysis.maths.stats import bootstrap_weights, percentile_interval
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import ATTN, Bench, Context, Section, Stage


class Sinks(Stage):
    def run(self, analysis: Bench, ctx: Context) -> None:
        add, eps = analysis.rec.add, analysis.opts.sink_eps
        weights = bootstrap_weights(analysis.opts.seqs, analysis.opts.bootstrap, seed=4)
        early = range(1, min(analysis.opts.early_queries, analysis.T))
        lift_min = analysis.opts.sink_lift
        for l, column in enumerate(ctx.base.first_column):
            window = analysis.windows[l]
            uniform = measures.uniform_alpha(analysis.T, window)
            alpha = measures.sink_alpha(column, window)  # (N, H)
            boot = (weights @ alpha) / weights.sum(1, keepdim=True)  # (R, H)
            lo, hi = percentile_interval(boot)
            lift = measures.key0_lift(column, window)  # (N, H)
            lift_lo, lift_hi = percentile_interval((weights @ lift) / weights.sum(1, keepdim=True))
            profile = column.double().mean(0)  # (H, T)
            add("sink_alpha0_uniform", uniform, layer=l)
            for h in range(analysis.H):
                add(
                    "sink_lift",
                    lift[:, h].mean(),
                    layer=l,
                    head=h,
                    lo=lift_lo[h],
                    hi=lift_hi[h],
                    n=len(lift),
                )
                add(
                    "sink_alpha0",
                    alpha[:, h].mean(),
                    layer=l,
                    head=h,
                    std=alpha[:, h].std(),
                    lo=lo[h],
                    hi=hi[h],
                    n=len(alpha),
                )
                for i in early:
                    add("a0_early", profile[h, i], layer=l, head=h, query=i)
                if alpha[:, h].mean() > eps:
                    for i in range(1, analysis.T):
                        add("sink_gain", profile[h, i], layer=l, head=h, query=i)
            rate = (alpha.mean(0) > eps).double().mean()
            add("sink_rate", rate, layer=l, condition={"eps": eps})
            sinks = (alpha.mean(0) > eps) & (lift.mean(0) >= lift_min)
            add(
                "sink_rate_lifted",
                sinks.double().mean(),
                layer=l,
                condition={"eps": eps, "lift": lift_min},
            )

    def per_layer(self, rows, opts) -> dict:
        alpha, lift = defaultdict(list), defaultdict(list)
        early = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["metric"] == "sink_alpha0":
                alpha[r["layer"]].append(r["value"])
            elif r["metric"] == "sink_lift":
                lift[r["layer"]].append(r["value"])
            elif r["metric"] == "a0_early":
                early[r["layer"]][r["head"]].append(r["value"])
        return {
            "alpha0_max": {l: max(v) for l, v in alpha.items()},
            "a0_early_max": {
                l: max(finite_mean(v) for v in heads.values()) for l, heads in early.items()
            },
            "sink_rate": {r["layer"]: r["value"] for r in rows if r["metric"] == "sink_rate"},
            "lift0_max": {l: max(v) for l, v in lift.items()},
            "sink_rate_lifted": {
                r["layer"]: r["value"] for r in rows if r["metric"] == "sink_rate_lifted"
            },
            "alpha0_uniform": {
                r["layer"]: r["value"] for r in rows if r["metric"] == "sink_alpha0_uniform"
            },
        }

    def figures(self, groups, out, opts) -> dict:
        return {
            "sinks": plots.head_maps(
                out / "sinks", groups, "sink_alpha0", "α₀", baseline="sink_alpha0_uniform"
            ),
            "lift": plots.head_maps(
                out / "sink_lift", groups, "sink_lift", "λ₀, mean n_i A_i0", ratio=True
            ),
        }

    def sections(self, opts) -> list:
        return [Section("Sinks: α₀ and the key-0 lift λ₀ per layer and head", ("sinks", "lift"))]


STAGE = Sinks(
    name="sinks",
    order=30,
    metrics={
        m: ATTN
        for m in (
            "sink_alpha0",
            "sink_alpha0_uniform",
            "sink_lift",
            "a0_early",
            "sink_gain",
            "sink_rate",
            "sink_rate_lifted",
        )
    },
    numbers=(
        Reported("alpha0_max", "α₀ of the strongest head", curve="alpha0_max", reduce="max"),
        Reported(
            "a0_early_max",
            "A_i0 at i < {early_queries}, strongest early reader",
            curve="a0_early_max",
            reduce="max",
        ),
        Reported(
            "alpha0_uniform",
            "α₀ of uniform attention (its baseline)",
            curve="alpha0_uniform",
            reduce="mean",
        ),
        Reported(
            "sink_rate",
            "sink rate, α₀ > {sink_eps:g} (mean over layers)",
            curve="sink_rate",
            reduce="mean",
        ),
        Reported(
            "lift0_max",
            "λ₀, key-0 lift of the strongest head (1 = uniform)",
            curve="lift0_max",
            reduce="max",
        ),
        Reported(
            "sink_rate_lifted",
            "sink rate, α₀ > {sink_eps:g} and λ₀ ≥ {sink_lift:g} (mean over layers)",
            curve="sink_rate_lifted",
            reduce="mean",
        ),
    ),
)
