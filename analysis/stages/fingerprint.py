"""Measurement 4: the position-0 fingerprint (docs/science.md): the dispersion across inputs of
x_0 at every residual site, and of each head's value W_O v_0 and position-0 output
A_i0 W_O v_0 at a fixed query, at batch size 1, with BOS and without."""

from __future__ import annotations

import torch

from posleak.analysis.engine.collect import store, stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import by_layer
from posleak.analysis.maths import measures
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import ATTN, RESID, Bench, Context, Section, Stage


class Fingerprint(Stage):
    def work(self, analysis: Bench) -> int:
        return 2 * analysis.opts.fingerprint_seqs * analysis.T

    def run(self, analysis: Bench, ctx: Context) -> None:
        i_f = min(analysis.opts.fingerprint_query, analysis.T - 1)
        for name, bos in (("bos", "always"), ("nobos", "never")):
            condition = {"bos": bos}
            if bos not in analysis.subject.bos_policies:  # a tokenizer without a BOS token
                continue
            tokens = analysis.tokens(analysis.opts.fingerprint_seqs, analysis.T, "fingerprint", bos)
            n, cfg = len(tokens), analysis.model.cfg
            x0 = [torch.empty(n, cfg.d_model) for _ in analysis.resid_names]
            v0 = [torch.empty(n, analysis.H, cfg.d_head) for _ in range(analysis.L)]
            gain = [torch.empty(n, analysis.H) for _ in range(analysis.L)]
            consumers = {
                name: store(x0[s], lambda x: x[:, 0]) for s, name in enumerate(analysis.resid_names)
            }
            for l in range(analysis.L):
                consumers[f"blocks.{l}.attn.v"] = store(v0[l], lambda v: v[:, :, 0])
                consumers[f"blocks.{l}.attn.pattern"] = store(gain[l], lambda p: p[:, :, i_f, 0])
            stream(analysis.model, tokens[:, : analysis.T], consumers, batch_size=1)
            for site, x in enumerate(x0):
                fp = measures.dispersion(x)
                analysis.rec.add(
                    "fingerprint_dispersion", fp["dispersion"], layer=site, condition=condition
                )
                analysis.rec.add(
                    "fingerprint_cosine", fp["cosine"], layer=site, condition=condition
                )
            for l in range(analysis.L):
                record_heads(analysis, l, v0[l], gain[l], condition, i_f)

    def per_layer(self, rows, opts) -> dict:
        return {
            f"fingerprint_dispersion_{name}": by_layer(
                rows, "fingerprint_dispersion", condition={"bos": bos}
            )
            for name, bos in (("bos", "always"), ("nobos", "never"))
        }

    def figures(self, groups, out, opts) -> dict:
        draw = lambda ax: plots.fingerprint_curve(ax, groups)  # noqa: E731
        return {"fp": plots.figure(out / "fingerprint", draw)}

    def sections(self, opts) -> list:
        return [Section("Position-0 fingerprint", ("fp",))]


def record_heads(analysis, layer, v0, gain, condition, i_f) -> None:
    o_proj = analysis.model.output_projection(layer).detach().double().cpu()
    dh = analysis.model.cfg.d_head
    for h in range(analysis.H):
        direction = v0[:, h].double() @ o_proj[:, h * dh : (h + 1) * dh].T  # W_O v_0, (n, d)
        value = measures.dispersion(direction)["dispersion"]
        output = measures.dispersion(gain[:, h, None].double() * direction)["dispersion"]
        analysis.rec.add(
            "fingerprint_value_dispersion", value, layer=layer, head=h, condition=condition
        )
        analysis.rec.add(
            "fingerprint_head_dispersion",
            output,
            layer=layer,
            head=h,
            query=i_f,
            condition=condition,
        )


STAGE = Fingerprint(
    name="fingerprint",
    order=60,
    metrics={
        "fingerprint_dispersion": RESID,
        "fingerprint_cosine": RESID,
        "fingerprint_value_dispersion": ATTN,
        "fingerprint_head_dispersion": ATTN,
    },
    numbers=(
        Reported(
            "fingerprint_nobos_last",
            "x₀ dispersion without BOS (last layer)",
            curve="fingerprint_dispersion_nobos",
            reduce="last",
        ),
    ),
)
