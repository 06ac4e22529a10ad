"""Version 3, item 9: NTK scaling at inference as a contrast inside one model. The analysed
sequences run again with static NTK scaling s (every rotary base b becomes b s^(d/(d-2)),
each layer type against its own base), and three things are read against the base pass on
the same sequences: the share of the early-query residual component it removes (per part,
layers >= 1, with the bootstrap paired by resampling the same sequence blocks in both
passes), the position a refit probe still finds, and the change of loss at every position."""

from __future__ import annotations

import torch

from posleak.analysis.stages._loss import record_change
from posleak.analysis.stages._removal import record_probes, record_removal_v3
from posleak.analysis.stages.base import RESID, RUN, Stage
from posleak.analysis.stats import bootstrap_weights


class NtkInference(Stage):
    def enabled(self, opts) -> bool:
        return bool(opts.ntk_scales)

    def work(self, analysis) -> int:
        return len(analysis.opts.ntk_scales) * analysis.opts.seqs * analysis.T

    def run(self, analysis, ctx) -> None:
        model = analysis.model
        if not model.cfg.scheme.inference_scale:  # no rotation to rescale (NoPE, learned)
            return
        trained = model.rope_inference_scale  # --rope-scale, if any, composes with s
        k = min(analysis.opts.early_queries, analysis.T)
        early = torch.zeros_like(ctx.base.losses, dtype=torch.bool)
        early[:, :k] = True
        groups = {"all": torch.ones_like(early), f"i<{k}": early}
        weights = bootstrap_weights(len(ctx.tokens), analysis.opts.bootstrap, seed=11)
        for s in analysis.opts.ntk_scales:
            label = f"s={s:g}"
            model.set_rope_scale(trained * s)
            try:
                scaled = analysis.measure(ctx.tokens, [], fitted=ctx.fitted, targets=ctx.targets)
            finally:
                model.set_rope_scale(trained)
            record_removal_v3(analysis, "ntk", label, ctx.base, scaled)
            change = scaled.losses - ctx.base.losses
            for group, mask in groups.items():
                cond = f"{label},queries={group}"
                record_change(analysis, "ntk_loss_change", cond, change, mask, weights)
            record_probes(analysis, "ntk", label, scaled)

    def headline(self, rows, layers, opts) -> dict:
        removed = {r["condition"]: r["value"] for r in rows if r["metric"] == "ntk_removed_v3"}
        loss = {r["condition"]: r["value"] for r in rows if r["metric"] == "ntk_loss_change"}
        refit = {
            (r["condition"], r["layer"]): r["value"]
            for r in rows
            if r["metric"] == "ntk_probe_refit_r2_log"
        }
        last = max((site for _, site in refit), default=None)
        out = {}
        for s in opts.ntk_scales:
            label = f"s={s:g}"
            out[f"ntk_removed_v3_s{s:g}_rest"] = removed.get(f"{label},part=rest")
            out[f"ntk_loss_s{s:g}"] = loss.get(f"{label},queries=all")
            out[f"ntk_probe_refit_r2_log_s{s:g}_last"] = refit.get((label, last))
        return out

    def headlines(self, opts, summaries) -> list:
        k = opts.early_queries
        return [
            row
            for s in opts.ntk_scales
            for row in (
                (
                    f"ntk_removed_v3_s{s:g}_rest",
                    f"removed by NTK s = {s:g}, keys j ≥ 1, i < {k} (v3)",
                ),
                (f"ntk_loss_s{s:g}", f"loss change by NTK s = {s:g} (nats, every position)"),
                (
                    f"ntk_probe_refit_r2_log_s{s:g}_last",
                    f"probe R² under NTK s = {s:g} (last layer)",
                ),
            )
        ]


STAGE = NtkInference(
    name="NTK at inference",
    order=58,
    reads=("blocks.{l}.attn.scores", "blocks.{l}.resid_post"),
    metrics={
        "ntk_removed_v3": RUN,
        "ntk_loss_change": RUN,
        "ntk_probe_r2_log": RESID,
        "ntk_probe_refit_r2_log": RESID,
    },
)
