"""Measurement 8: length extrapolation (docs/science.md): validation loss per position at
multiples of the training length, and for RoPE models also with NTK scaling at inference
(s = the length ratio, composed with a trained s)."""

from __future__ import annotations

import torch

from posleak.analysis.engine.collect import token_losses
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import RUN, Bench, Context, Section, Stage

NTK = ("none", "length ratio")  # NTK at inference: none, or s = the length's multiple


class Extrapolation(Stage):
    def work(self, analysis: Bench) -> int:
        subject, cfg = analysis.subject, analysis.model.cfg
        multiples = analysis.opts.extrapolation if subject.extrapolate else (1,)
        T0 = subject.train_len if subject.extrapolate else analysis.T
        scales = lambda m: 2 if cfg.scheme.inference_scale and m > 1 else 1  # noqa: E731
        return sum(analysis.opts.extrapolation_seqs * T0 * m * scales(m) for m in multiples)

    def run(self, analysis: Bench, ctx: Context) -> None:
        subject, cfg = analysis.subject, analysis.model.cfg
        T0 = subject.train_len if subject.extrapolate else analysis.T
        for m in analysis.opts.extrapolation if subject.extrapolate else (1,):
            length = T0 * m
            limit = cfg.scheme.max_len(cfg)
            if limit is not None and length > limit:
                continue
            try:
                tokens = analysis.tokens(analysis.opts.extrapolation_seqs, length, "extrapolation")
            except ValueError:  # the validation split is shorter than this length
                continue
            scales = [1.0, float(m)] if cfg.scheme.inference_scale and m > 1 else [1.0]
            for s in scales:
                analysis.set_rope_scale(s)
                losses = loss_by_position(analysis, tokens)
                cond = {"len": length, "multiple": m, "ntk": NTK[s > 1]}
                for i in range(length):
                    analysis.rec.add("loss_by_position", losses[i], query=i, condition=cond)
                analysis.rec.add("loss_mean", losses.mean(), condition=cond)
                beyond = losses[T0:].mean() if m > 1 else None
                analysis.rec.add("loss_beyond_train", beyond, condition=cond)
        analysis.set_rope_scale(analysis.opts.rope_scale or 1.0)

    def figures(self, groups, out, opts) -> dict:
        draw = lambda ax: plots.extrapolation_curve(ax, groups)  # noqa: E731
        return {"extrapolation": plots.figure(out / "extrapolation", draw)}

    def sections(self, opts) -> list:
        return [Section("Length extrapolation", ("extrapolation",))]


def loss_by_position(analysis, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss at each position."""
    opts = analysis.opts
    return token_losses(analysis.model, tokens, opts.max_attention_elements).mean(0)


STAGE = Extrapolation(
    name="length extrapolation",
    order=80,
    metrics={"loss_by_position": RUN, "loss_mean": RUN, "loss_beyond_train": RUN},
    numbers=(
        Reported(
            "loss_beyond_train",
            "loss beyond T_train at {multiple}× T_train, NTK at inference: {ntk}",
            unit="nats",
            conditions={
                "multiple": lambda opts: [m for m in opts.extrapolation if m > 1],
                "ntk": NTK,
            },
            parameters=("len",),
        ),
    ),
)
