"""Measurement 6b: what the key-0 knockout does to the loss (docs/science.md, version 3
item 7): the change of next-token loss when key 0 is knocked out in every layer, and in the
sink heads only, against control knockouts (key 1, and a random earlier key of key 0's mass,
the latter also in the sink heads only). On a corpus that marks its copy targets (backcopy)
the change is split into copy targets and the others: a sink that parks a head idle matters
for the queries that do not copy."""

from __future__ import annotations

import torch

from posleak.analysis.engine.collect import stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.maths import measures
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.stages._hooks import on_heads
from posleak.analysis.stages._loss import record_change, target_groups
from posleak.analysis.stages.base import RUN, Bench, Context, Stage
from posleak.analysis.stages.knockout import losses_label


class KnockoutLoss(Stage):
    def work(self, analysis: Bench) -> int:
        return 2 * analysis.opts.seqs * analysis.T  # two rules in the sink heads

    def enabled(self, opts) -> bool:
        return opts.knockout

    def run(self, analysis: Bench, ctx: Context) -> None:
        tokens = torch.cat([ctx.tokens, ctx.targets[:, -1:]], dim=1)  # (N, T + 1)
        groups = target_groups(analysis.subject.copy_targets, tokens)
        base = ctx.base.losses
        heads = sink_heads(analysis, ctx)
        analysis.rec.add("knockout_sink_heads", sum(len(h) for h in heads.values()))
        keys = measures.random_earlier_keys(analysis.T, analysis.window, analysis.subject.seed)
        rules = {
            0: measures.knock_out_key0,
            1: lambda p: measures.knock_out_key(p, 1),
            "random": lambda p: measures.knock_out_random_key(p, keys),
        }
        delta = {}  # (key, heads) -> per-token loss change
        for key, rule in rules.items():
            delta[key, "all"] = ctx.losses[losses_label(key)] - base  # the knockout stage's passes
            if heads and key != 1:
                hooks = [(f"blocks.{l}.attn.pattern", on_heads(rule, h)) for l, h in heads.items()]
                knocked = stream(analysis.model, ctx.tokens, {}, analysis.batch, hooks, ctx.targets)
                delta[key, "sinks"] = knocked - base
        for which in ("all", "sinks") if heads else ("all",):  # paired per token
            delta[EXCESS, which] = delta[0, which] - delta["random", which]
        weights = bootstrap_weights(len(tokens), analysis.opts.bootstrap, seed=5)
        for (key, which), change in delta.items():
            for group, mask in groups.items():
                condition = {"key": key, "heads": which, "targets": group}
                record_change(analysis, "knockout_loss_change", condition, change, mask, weights)
        by_query = delta[0, "all"].mean(0)
        for i in range(analysis.T):
            analysis.rec.add("knockout_loss_change_by_query", by_query[i], query=i)


EXCESS = "0 minus random"  # the key-0 knockout's change minus the random-key control's


def loss_change(rows: list[dict], condition: dict) -> float | None:
    """The mean loss change of one knockout: on the non-copy targets where a copy corpus marks
    them (a sink that parks a head idle matters for the queries that do not copy), else on
    every target."""
    changes = [r for r in rows if r["metric"] == "knockout_loss_change"]
    group = "other" if any(r["condition"]["targets"] == "other" for r in changes) else "all"
    wanted = {**condition, "targets": group}
    return next((r["value"] for r in changes if r["condition"] == wanted), None)


def sink_heads(analysis, ctx) -> dict:
    """{layer: [head, ...]} of the heads with alpha_0 > eps and lambda_0 >= lift."""
    out = {}
    for l, column in enumerate(ctx.base.first_column):
        alpha = measures.sink_alpha(column, analysis.windows[l]).mean(0)
        lift = measures.key0_lift(column, analysis.windows[l]).mean(0)
        chosen = ((alpha > analysis.opts.sink_eps) & (lift >= analysis.opts.sink_lift)).nonzero()
        if len(chosen):
            out[l] = chosen.flatten().tolist()
    return out


STAGE = KnockoutLoss(
    needs=("knockout",),
    name="knockout loss",
    order=55,
    metrics={
        m: RUN
        for m in ("knockout_loss_change", "knockout_loss_change_by_query", "knockout_sink_heads")
    },
    numbers=(
        Reported(
            "knockout_loss_change",
            "loss change, key {key} knocked out in {heads} heads (non-copy targets on a copy "
            "corpus, else all)",
            unit="nats",
            conditions={"key": (0, "random", EXCESS), "heads": ("all", "sinks")},
            compute=lambda rows, layers, opts, c: loss_change(rows, c),
        ),
        Reported("knockout_sink_heads", "sink heads (α₀ > ε and λ₀ ≥ lift), all layers"),
    ),
)
