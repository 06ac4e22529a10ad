"""Version 3, item 8: which route carries position from key 0. The route-2 test replaces
every head's key-0 contribution by its mean over queries (measures.key0_gain_removed): what
position a refit probe still finds is what does not come through key 0's position-dependent
gain. Then, head by head for the top heads by key-0 lift, the key-0 knockout and the route-2
test in that head alone. Each reports the refit probe's R² (position left), the original
probe's transfer R² and the C_res removed at early queries (v3)."""

from __future__ import annotations

from posleak.analysis import measures
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
            return {"route2": flatten, "key=0": measures.knock_out_key0}

        every = [
            (f"blocks.{l}.attn.pattern", on_heads(rules(l)["route2"], None))
            for l in range(analysis.L)
        ]
        intervene(analysis, ctx, "route2,heads=all", every)
        for l, h, lift in top_heads(analysis, ctx):
            analysis.rec.add("top_head_lift", lift, layer=l, head=h)
            for name, rule in rules(l).items():
                hooks = [(f"blocks.{l}.attn.pattern", on_heads(rule, [h]))]
                intervene(analysis, ctx, f"{name},layer={l},head={h}", hooks)

    def headline(self, rows, layers, opts) -> dict:
        refit = {
            (r["condition"], r["layer"]): r["value"]
            for r in rows
            if r["metric"] == "route2_probe_refit_r2_log"
        }
        last = max((site for _, site in refit), default=None)
        heads = [v for (c, site), v in refit.items() if site == last and c.startswith("key=0,")]
        removed = {r["condition"]: r["value"] for r in rows if r["metric"] == "route2_removed_v3"}
        return {
            "route2_r2_left_last": refit.get(("route2,heads=all", last)),
            "route2_removed_v3_all": removed.get("route2,heads=all,part=all"),
            "head_knockout_r2_left_min": min((v for v in heads if v is not None), default=None),
        }

    def headlines(self, opts, summaries) -> list:
        return [
            ("route2_r2_left_last", "probe R² refit with key 0's gain flattened (last layer)"),
            ("route2_removed_v3_all", "C_res removed by flattening key 0's gain (v3)"),
            (
                "head_knockout_r2_left_min",
                f"lowest refit R² after one head's key-0 knockout (top {opts.top_heads} by λ₀)",
            ),
        ]


def top_heads(analysis, ctx) -> list[tuple[int, int, float]]:
    """(layer, head, lambda_0) of the top_heads heads by key-0 lift."""
    found = []
    for l, column in enumerate(ctx.base.first_column):
        lift = measures.key0_lift(column, analysis.windows[l]).mean(0)
        found += [(l, h, float(v)) for h, v in enumerate(lift)]
    return sorted(found, key=lambda t: -t[2])[: analysis.opts.top_heads]


def intervene(analysis, ctx, label: str, hooks) -> None:
    """One intervened pass: C_res removed, transfer R^2 and refit R^2 per residual site."""
    done = analysis.measure(ctx.tokens, hooks, fitted=ctx.fitted)
    record_removal(analysis, "route2", label, ctx.base, done)
    record_probes(analysis, "route2", label, done)


STAGE = Route2(
    name="route-2 and head knockouts",
    order=52,
    reads=("blocks.{l}.attn.pattern", "blocks.{l}.resid_post"),
    metrics={
        "route2_removed": ATTN,
        "route2_removed_c_mask": ATTN,
        "route2_removed_v3": RUN,
        "route2_probe_r2_log": RESID,
        "route2_probe_refit_r2_log": RESID,
        "top_head_lift": ATTN,
    },
)
