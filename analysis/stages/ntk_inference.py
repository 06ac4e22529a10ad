"""Version 3, item 9: NTK scaling at inference as a contrast inside one model. The analysed
sequences run again with static NTK scaling s (every rotary base b becomes b s^(d/(d-2)),
each layer type against its own base), and three things are read against the base pass on
the same sequences: the share of the early-query residual component it removes (per part,
layers >= 1, with the bootstrap paired by resampling the same sequence blocks in both
passes), the position a refit probe still finds, and the change of loss at every position."""

from __future__ import annotations

import torch

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.maths import content
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.stages._loss import record_change
from posleak.analysis.stages._removal import record_probes, record_removal_v3
from posleak.analysis.stages.base import RESID, RUN, Bench, Context, Stage


class NtkInference(Stage):
    def enabled(self, opts) -> bool:
        return bool(opts.ntk_scales)

    def work(self, analysis: Bench) -> int:
        return len(analysis.opts.ntk_scales) * analysis.opts.seqs * analysis.T

    def run(self, analysis: Bench, ctx: Context) -> None:
        model = analysis.model
        if not model.cfg.scheme.inference_scale:  # no rotation to rescale (NoPE, learned)
            return
        trained = model.rope_inference_scale  # --rope-scale, if any, composes with s
        k = min(analysis.opts.early_queries, analysis.T)
        early = torch.zeros_like(ctx.base.losses, dtype=torch.bool)
        early[:, :k] = True
        groups = {"all": torch.ones_like(early), "early": early}  # early: queries i < k
        weights = bootstrap_weights(len(ctx.tokens), analysis.opts.bootstrap, seed=11)
        for s in analysis.opts.ntk_scales:
            label = {"s": float(s)}
            model.set_rope_scale(trained * s)
            try:
                scaled = analysis.measure(ctx.tokens, [], fitted=ctx.fitted, targets=ctx.targets)
            finally:
                model.set_rope_scale(trained)
            record_removal_v3(analysis, "ntk", label, ctx.base, scaled)
            change = scaled.losses - ctx.base.losses
            for group, mask in groups.items():
                cond = {**label, "queries": group}
                record_change(analysis, "ntk_loss_change", cond, change, mask, weights)
            record_probes(analysis, "ntk", label, scaled)


STAGE = NtkInference(
    needs=("probe",),
    name="NTK at inference",
    order=58,
    metrics={
        "ntk_removed_v3": RUN,
        "ntk_removed_share": RUN,
        "ntk_loss_change": RUN,
        "ntk_probe_r2_log": RESID,
        "ntk_probe_refit_r2_log": RESID,
    },
    numbers=(
        Reported(
            "ntk_removed_v3",
            "removed by NTK s = {s}, part {part}, i < {early_queries} (v3)",
            unit="share",
            conditions={"s": "ntk_scales", "part": ("rest",)},
        ),
        Reported(
            "ntk_loss_change",
            "loss change by NTK s = {s}, queries: {queries}",
            unit="nats",
            conditions={"s": "ntk_scales", "queries": ("all",)},
        ),
        Reported(
            "ntk_probe_refit_r2_log_last",
            "probe R² under NTK s = {s} (last layer)",
            unit="R²",
            metric="ntk_probe_refit_r2_log",
            reduce="last",
            conditions={"s": "ntk_scales"},
        ),
        Reported(
            "ntk_removed_share",
            "removed by NTK s = {s}, {part} part, i < {early_queries}, layers ≥ 1",
            unit="share",
            conditions={"s": "ntk_scales", "part": content.PARTS},
        ),
    ),
)
