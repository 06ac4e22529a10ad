"""Version 4, item 7: which route carries position from key 0, in every head of every layer
at once (docs/science.md):
- write route (`rule=write`, version 3's route-2 test): A_i0 replaced by its mean ā over the
  queries, the other keys untouched: key 0's value arrives with a constant gain;
- mass route (`rule=mass`): A_i0 := ā and the other keys rescaled to keep the row's total:
  neither key 0's write nor its dilution of the content keys depends on i;
- value ablation (`rule=value`): position 0's value replaced by the mean content value,
  attention kept.
Then, head by head for the top heads by key-0 lift, the key-0 knockout and the write route in
that head alone. Each reports the refit probe's R² (position left), the original probe's
transfer R², the removed shares, and (every-head rules) the change of next-token loss at the
early queries and at all of them; a report pairs each with the same run at step 0."""

from __future__ import annotations

import torch

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.maths import content, measures
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.stages._hooks import on_heads
from posleak.analysis.stages._loss import record_change
from posleak.analysis.stages._removal import record_probes, record_removal
from posleak.analysis.stages.base import ATTN, RESID, RUN, Bench, Context, Stage


class Route2(Stage):
    def work(self, analysis: Bench) -> int:
        return (len(ROUTES) + 2 * analysis.opts.top_heads) * analysis.opts.seqs * analysis.T

    def enabled(self, opts) -> bool:
        return opts.knockout

    def run(self, analysis: Bench, ctx: Context) -> None:
        def rules(l: int) -> dict:
            flatten = lambda p: measures.key0_gain_removed(p, analysis.windows[l])  # noqa: E731
            return {"write": flatten, "knockout": measures.knock_out_key0}

        weights = bootstrap_weights(len(ctx.tokens), analysis.opts.bootstrap, seed=8)
        for rule in ROUTES:
            hooks = [route_hook(analysis, rule, l) for l in range(analysis.L)]
            done = intervene(analysis, ctx, {"rule": rule, "heads": "all"}, hooks, loss=True)
            change = done.losses - ctx.base.losses
            for queries, mask in query_groups(analysis, change.shape).items():
                condition = {"rule": rule, "queries": queries}
                record_change(analysis, "route_loss_change", condition, change, mask, weights)
        for l, h, lift in top_heads(analysis, ctx):
            analysis.rec.add("top_head_lift", lift, layer=l, head=h)
            for name, rule in rules(l).items():
                hooks = [(f"blocks.{l}.attn.pattern", on_heads(rule, [h]))]
                intervene(analysis, ctx, {"rule": name, "layer": l, "head": h}, hooks)


def head_knockout_min(rows: list[dict]) -> float | None:
    """The lowest refit probe R² at the last residual site over the single-head knockouts."""
    refit = [r for r in rows if r["metric"] == "route2_probe_refit_r2_log"]
    last = max((r["layer"] for r in refit), default=None)
    heads = [
        r["value"]
        for r in refit
        if r["layer"] == last and r["condition"]["rule"] == "knockout" and r["value"] is not None
    ]
    return min(heads, default=None)


def top_heads(analysis, ctx) -> list[tuple[int, int, float]]:
    """(layer, head, lambda_0) of the top_heads heads by key-0 lift."""
    found = []
    for l, column in enumerate(ctx.base.first_column):
        lift = measures.key0_lift(column, analysis.windows[l]).mean(0)
        found += [(l, h, float(v)) for h, v in enumerate(lift)]
    return sorted(found, key=lambda t: -t[2])[: analysis.opts.top_heads]


ROUTES = ("write", "mass", "value")


def route_hook(analysis, rule: str, layer: int) -> tuple:
    """The (hook point, hook) of one every-head route in one layer."""
    window = analysis.windows[layer]
    if rule == "value":
        return f"blocks.{layer}.attn.v", lambda values, name: measures.value0_to_mean(values)
    flatten = measures.key0_gain_removed if rule == "write" else measures.key0_mass_flattened
    return f"blocks.{layer}.attn.pattern", on_heads(lambda p: flatten(p, window), None)


def query_groups(analysis, shape) -> dict:
    """{queries: (N, T) mask}: the early queries 1 <= i < early_queries, and every query."""
    early = torch.zeros(shape, dtype=torch.bool)
    early[:, 1 : min(analysis.opts.early_queries, analysis.T)] = True
    return {"early": early, "all": torch.ones(shape, dtype=torch.bool)}


def intervene(analysis, ctx, label: dict, hooks, loss: bool = False):
    """One intervened pass: C_res removed, transfer R^2 and refit R^2 per residual site (and,
    with `loss`, every position's loss)."""
    targets = ctx.targets if loss else None
    done = analysis.measure(ctx.tokens, hooks, fitted=ctx.fitted, targets=targets)
    record_removal(analysis, "route2", label, ctx.base, done)
    record_probes(analysis, "route2", label, done)
    return done


STAGE = Route2(
    needs=("probe",),
    name="routes and head knockouts",
    order=52,
    metrics={
        "route2_removed": ATTN,
        "route2_removed_c_mask": ATTN,
        "route2_removed_v3": RUN,
        "route2_removed_share": RUN,
        "route2_probe_r2_log": RESID,
        "route2_probe_refit_r2_log": RESID,
        "top_head_lift": ATTN,
        "route_loss_change": RUN,
    },
    numbers=(
        Reported(
            "route2_r2_left_last",
            "probe R² refit after the {rule} route (last layer)",
            unit="R²",
            metric="route2_probe_refit_r2_log",
            reduce="last",
            conditions={"rule": ROUTES},
            where={"heads": "all"},
        ),
        Reported(
            "route_loss_change",
            "loss change under the {rule} route, {queries} queries",
            unit="nats",
            conditions={"rule": ROUTES, "queries": ("early", "all")},
        ),
        Reported(
            "route2_removed_v3",
            "C_res removed by flattening key 0's gain (v3)",
            unit="share",
            where={"rule": "write", "heads": "all", "part": "all"},
        ),
        Reported(
            "head_knockout_r2_left_min",
            "lowest refit R² after one head's key-0 knockout (top {top_heads} by λ₀)",
            unit="R²",
            compute=lambda rows, layers, opts, condition: head_knockout_min(rows),
        ),
        Reported(
            "route2_removed_share",
            "removed by the {rule} route, {part} part",
            unit="share",
            conditions={"rule": ROUTES, "part": content.PARTS},
            where={"heads": "all"},
        ),
    ),
)
