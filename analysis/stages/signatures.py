"""What sinks look like besides attention (docs/science.md, version 3, item 6): the massive
activation ||x_0|| / median_i ||x_i|| at every residual site, with position 0's largest
coordinate; each head's value drain ||W_O v_0|| / median_i ||W_O v_i||; and, for a model with
a sink logit or softpick attention, the attention mass each head gives no key (1 - sum_j A_ij:
the sink logit's virtual key, softpick's unspent weight). Read on
a subsample of the analysed sequences, in one pass of its own."""

from __future__ import annotations

import torch

from posleak.analysis.engine.collect import stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import by_layer
from posleak.analysis.maths import measures
from posleak.analysis.maths.stats import bootstrap_weights, percentile_interval
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import ATTN, RESID, Bench, Context, Section, Stage


class Signatures(Stage):
    def work(self, analysis: Bench) -> int:
        return analysis.opts.signature_seqs * analysis.T

    def run(self, analysis: Bench, ctx: Context) -> None:
        tokens = ctx.tokens[: analysis.opts.signature_seqs]
        n, L, H = len(tokens), analysis.L, analysis.H
        ratio = [torch.empty(n, dtype=torch.float64) for _ in analysis.resid_names]
        first = [torch.zeros(analysis.model.cfg.d_model, dtype=torch.float64) for _ in ratio]
        every = [torch.zeros(analysis.T, dtype=torch.float64) for _ in ratio]  # summed ratios
        drain = [torch.empty(n, H, dtype=torch.float64) for _ in range(L)]
        parked = [torch.empty(n, H, dtype=torch.float64) for _ in range(L)]
        consumers = {}
        for site, name in enumerate(analysis.resid_names):
            consumers[name] = _residual(ratio[site], first[site], every[site])
        for l in range(L):
            o_proj = analysis.model.output_projection(l).detach().double().cpu()
            consumers[f"blocks.{l}.attn.v"] = _drain(drain[l], o_proj, analysis.model.cfg.d_head)
        cfg = analysis.model.cfg
        sink = getattr(cfg, "sink", "none") != "none" or getattr(cfg, "attention", "") == "softpick"
        if sink:
            for l in range(L):
                consumers[f"blocks.{l}.attn.pattern"] = _parked(parked[l])
        stream(analysis.model, tokens, consumers, analysis.batch)
        weights = bootstrap_weights(n, analysis.opts.bootstrap, seed=5)
        add = analysis.rec.add
        for site, (r, x0) in enumerate(zip(ratio, first, strict=True)):
            lo, hi = percentile_interval(weights @ r / weights.sum(1))
            add("massive_ratio", r.mean(), layer=site, lo=lo, hi=hi, n=n)
            top = int(x0.abs().argmax())
            add("massive_top", x0[top].abs() / n, layer=site, condition={"dim": int(top)}, n=n)
            j = int(every[site][1:].argmax()) + 1  # the most massive position after 0
            rest = every[site][j] / n
            add("massive_ratio_rest", rest, layer=site, condition={"position": j}, n=n)
        for l in range(L):
            for h in range(H):
                add("value_drain", drain[l][:, h].mean(), layer=l, head=h, n=n)
                if sink:
                    add("sink_virtual_mass", parked[l][:, h].mean(), layer=l, head=h, n=n)

    def per_layer(self, rows, opts) -> dict:
        drains: dict = {}
        for r in rows:
            if r["metric"] == "value_drain":
                drains.setdefault(r["layer"], []).append(r["value"])
        return {
            "massive_ratio": by_layer(rows, "massive_ratio"),
            "value_drain_min": {l: min(v) for l, v in drains.items()},
        }

    def figures(self, groups, out, opts) -> dict:
        def draw(ax):
            plots.layer_curve(
                ax,
                groups,
                "massive_ratio",
                "‖x₀‖ / median ‖x_i‖",
                "Massive activation at position 0",
                query=None,
                condition=None,
            )
            ax.set_xlabel("residual site (0 = embedding)")

        return {
            "massive": plots.figure(out / "massive", draw),
            "drain": plots.head_maps(out / "value_drain", groups, "value_drain", "value drain"),
        }

    def sections(self, opts) -> list:
        return [
            Section("Sink signatures: massive activation and value drain", ("massive", "drain"))
        ]


def _residual(ratio: torch.Tensor, first: torch.Tensor, every: torch.Tensor):
    def consume(x, rows):
        ratios = measures.position_ratios(x)
        ratio[rows] = ratios[:, 0]
        every.add_(ratios.sum(0))  # summed over sequences, as `first`
        first.add_(x[:, 0].double().sum(0))  # summed; divided by the count when recorded

    return consume


def _drain(out: torch.Tensor, o_proj: torch.Tensor, d_head: int):
    def consume(v, rows):  # v (B, H, T, d_head); head h writes W_O[:, h*dh:(h+1)*dh] v
        H = v.shape[1]
        per_head = o_proj.view(o_proj.shape[0], H, d_head)  # (d, H, dh)
        written = torch.einsum("bhtk,dhk->bhtd", v.double(), per_head)
        out[rows] = measures.value_drain(written)

    return consume


def _parked(out: torch.Tensor):
    def consume(pattern, rows):  # the virtual key's mass: what the visible keys do not get
        out[rows] = (1 - pattern[..., 1:, :].double().sum(-1)).mean(-1)

    return consume


STAGE = Signatures(
    name="sink signatures",
    order=35,
    metrics={
        "massive_ratio": RESID,
        "massive_ratio_rest": RESID,
        "massive_top": RESID,
        "value_drain": ATTN,
        "sink_virtual_mass": ATTN,
    },
    numbers=(
        Reported(
            "massive_ratio_max",
            "massive activation ‖x₀‖ / median ‖x_i‖ (largest over layers)",
            curve="massive_ratio",
            reduce="max",
        ),
        Reported(
            "value_drain_min",
            "value drain ‖W_O v₀‖ / median ‖W_O v_i‖ (smallest head)",
            curve="value_drain_min",
            reduce="min",
        ),
    ),
)
