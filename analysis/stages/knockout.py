"""Measurement 6: the key-0 knockout (docs/science.md): A_i0 set to 0 for i >= 1 and the row
renormalised, in every layer at once (and one layer at a time when asked); what it removes
of C_res and C_mask downstream, and the original probe on the knocked-out states."""

from __future__ import annotations

from posleak.analysis import measures, plots
from posleak.analysis.records import by_layer
from posleak.analysis.stages._removal import record_removal
from posleak.analysis.stages.base import ATTN, RESID, Section, Stage


class Knockout(Stage):
    def enabled(self, opts) -> bool:
        return opts.knockout

    def run(self, analysis, ctx) -> None:
        per_layer = list(range(analysis.L)) if analysis.opts.knockout_per_layer else []
        for target in [*per_layer, "all"]:
            knock_out(analysis, ctx, target)

    def per_layer(self, rows, opts) -> dict:
        return {
            "knockout_probe_r2_log": by_layer(rows, "knockout_probe_r2_log", condition="layer=all")
        }

    def headline(self, rows, layers, opts) -> dict:
        knocked, intact = layers["knockout_probe_r2_log"], layers["probe_r2_log"]
        if not knocked or not intact:
            return {}
        return {"knockout_probe_r2_log_drop": intact[max(intact)] - knocked[max(knocked)]}

    def headlines(self, opts, summaries) -> list:
        return [("knockout_probe_r2_log_drop", "probe R² lost by key-0 knockout (last layer)")]

    def figures(self, groups, out, opts) -> dict:
        draw = lambda ax: plots.knockout_curve(ax, groups)  # noqa: E731
        return {"knockout": plots.figure(out / "knockout", draw)}

    def sections(self, opts) -> list:
        return [Section("Key-0 knockout", ("knockout",))]


def knock_out(analysis, ctx, target) -> None:
    """The knockout in one layer (an int) or in every layer ("all")."""
    layers = range(analysis.L) if target == "all" else [target]
    hooks = [(f"blocks.{l}.attn.pattern", _knockout) for l in layers]
    knocked = analysis.measure(ctx.tokens, hooks, fitted=ctx.fitted)
    record_removal(analysis, "knockout", f"layer={target}", ctx.base, knocked)
    for site, r2 in enumerate(knocked.probe_r2_log):
        analysis.rec.add("knockout_probe_r2_log", r2, layer=site, condition=f"layer={target}")


def _knockout(pattern, name):
    return measures.knock_out_key0(pattern)


STAGE = Knockout(
    name="key-0 knockout",
    order=50,
    reads=("blocks.{l}.attn.pattern", "blocks.{l}.resid_post"),
    metrics={
        "knockout_removed": ATTN,
        "knockout_removed_c_mask": ATTN,
        "knockout_probe_r2_log": RESID,
    },
)
