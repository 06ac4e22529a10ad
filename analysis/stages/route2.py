"""Version 3, item 8: which route carries position from key 0. The route-2 test replaces
every head's key-0 contribution by its mean over queries (measures.key0_gain_removed): what
position a refit probe still finds is what does not come through key 0's position-dependent
gain. Then, head by head for the top heads by key-0 lift, the key-0 knockout and the route-2
test in that head alone. Each reports the refit probe's R² (position left), the original
probe's transfer R² and the C_res removed at early queries (v3)."""

from __future__ import annotations

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.maths import content, measures
from posleak.analysis.stages._hooks import on_heads
from posleak.analysis.stages._removal import record_probes, record_removal
from posleak.analysis.stages.base import ATTN, RESID, RUN, Stage


class Route2(Stage):
    def work(self, analysis) -> int:
        return (1 + 2 * analysis.opts.top_heads) * analysis.opts.seqs * analysis.T

    def enabled(self, opts) -> bool:
        return opts.knockout

    def run(self, analysis, ctx) -> None:
        def rules(l: int) -> dict:
            flatten = lambda p: measures.key0_gain_removed(p, analysis.windows[l])  # noqa: E731
            return {"route2": flatten, "knockout": measures.knock_out_key0}

        every = [
            (f"blocks.{l}.attn.pattern", on_heads(rules(l)["route2"], None))
            for l in range(analysis.L)
        ]
        intervene(analysis, ctx, {"rule": "route2", "heads": "all"}, every)
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


def intervene(analysis, ctx, label: dict, hooks) -> None:
    """One intervened pass: C_res removed, transfer R^2 and refit R^2 per residual site."""
    done = analysis.measure(ctx.tokens, hooks, fitted=ctx.fitted)
    record_removal(analysis, "route2", label, ctx.base, done)
    record_probes(analysis, "route2", label, done)


STAGE = Route2(
    needs=("probe",),
    name="route-2 and head knockouts",
    order=52,
    metrics={
        "route2_removed": ATTN,
        "route2_removed_c_mask": ATTN,
        "route2_removed_v3": RUN,
        "route2_removed_share": RUN,
        "route2_probe_r2_log": RESID,
        "route2_probe_refit_r2_log": RESID,
        "top_head_lift": ATTN,
    },
    numbers=(
        Reported(
            "route2_r2_left_last",
            "probe R² refit with key 0's gain flattened (last layer)",
            unit="R²",
            metric="route2_probe_refit_r2_log",
            reduce="last",
            where={"rule": "route2", "heads": "all"},
        ),
        Reported(
            "route2_removed_v3",
            "C_res removed by flattening key 0's gain (v3)",
            unit="share",
            where={"rule": "route2", "heads": "all", "part": "all"},
        ),
        Reported(
            "head_knockout_r2_left_min",
            "lowest refit R² after one head's key-0 knockout (top {top_heads} by λ₀)",
            unit="R²",
            compute=lambda rows, layers, opts, condition: head_knockout_min(rows),
        ),
        Reported(
            "route2_removed_share",
            "removed by flattening key 0's gain, {part} part",
            unit="share",
            conditions={"part": content.PARTS},
            where={"rule": "route2", "heads": "all"},
        ),
    ),
)
