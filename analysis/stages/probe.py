"""Measurement 1: the position probe per residual site (docs/science.md).

Ridge probes x_i -> i and x_i -> log(1 + i), fitted on half A from sufficient statistics that
the base pass accumulated (lambda cross-validated by sequence), then scored on half B in a
pass of their own. The fitted probes are kept in the context: the interventions score the
intervened residual stream with them."""

from __future__ import annotations

from posleak.analysis.engine.collect import each, stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import by_layer
from posleak.analysis.maths import measures
from posleak.analysis.maths import probe as probes
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import RESID, Bench, Context, Section, Stage

TARGETS = (("linear", ""), ("log", "_log"))


class Probe(Stage):
    def work(self, analysis: Bench) -> int:
        return analysis.opts.seqs // 2 * analysis.T  # half B, scored

    def run(self, analysis: Bench, ctx: Context) -> None:
        """Fit both probes per residual site on half A, then score them on half B."""
        tokens = ctx.tokens
        b = analysis.halves(len(tokens))[1]
        fitted = [{t: data.fit(t) for t, _ in TARGETS} for data in ctx.base.probe_data]
        scorers = [
            {t: probes.Scorer(site[t], analysis.positions, len(b)) for t, _ in TARGETS}
            for site in fitted
        ]
        start = analysis.opts.probe_min_pos
        consumers = {
            name: each(
                [lambda resid, rows, s=s: s.add(resid[:, start:], rows) for s in site.values()]
            )
            for name, site in zip(analysis.resid_names, scorers, strict=True)
        }
        stream(analysis.model, tokens[b], consumers, analysis.batch)
        weights = bootstrap_weights(len(b), analysis.opts.bootstrap, seed=3)
        add = analysis.rec.add
        for layer, (site, site_scorers) in enumerate(zip(fitted, scorers, strict=True)):
            for target, suffix in TARGETS:
                s = site_scorers[target].result()
                lo, hi = probes.r2_interval(s, weights)
                add(f"probe_r2{suffix}", s.r2, layer=layer, lo=lo, hi=hi, n=len(b))
                add(f"probe_mae{suffix}", s.mae, layer=layer, n=len(b))
                add(f"probe_lambda{suffix}", site[target].lam, layer=layer)
            positions = analysis.positions
            add("probe_mae_mean", probes.mean_baseline_mae(positions, positions), layer=layer)
            add("probe_mae_uniform", measures.uniform_guess_mae(len(positions)), layer=layer)
        ctx.fitted = fitted

    def per_layer(self, rows, opts) -> dict:
        names = ("probe_r2", "probe_r2_log", "probe_mae", "probe_mae_log", "probe_mae_mean")
        out = {m: by_layer(rows, m) for m in names}
        out["probe_r2_log_interval"] = {  # 95% bootstrap interval over held-out sequences
            r["layer"]: [r["lo"], r["hi"]]
            for r in rows
            if r["metric"] == "probe_r2_log" and not r["condition"] and r["head"] is None
        }
        return out

    def figures(self, groups, out, opts) -> dict:
        return {"probe": plots.figure(out / "probe", lambda ax: plots.probe_curve(ax, groups))}

    def sections(self, opts) -> list:
        return [Section("Position probe (held-out R², log target)", ("probe",))]


STAGE = Probe(
    name="probes",
    order=10,
    metrics={
        m: RESID
        for m in (
            "probe_r2",
            "probe_r2_log",
            "probe_mae",
            "probe_mae_log",
            "probe_lambda",
            "probe_lambda_log",
            "probe_mae_mean",
            "probe_mae_uniform",
        )
    },
    numbers=(
        Reported(
            "probe_r2_log_last",
            "probe R², log target (last layer)",
            "R²",
            metric="probe_r2_log",
            reduce="last",
        ),
        Reported(
            "probe_r2_log_mean",
            "probe R², log target (mean over layers ≥ 1)",
            "R²",
            metric="probe_r2_log",
            reduce="mean_from_1",
        ),
    ),
)
