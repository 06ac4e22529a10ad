"""Measurement 6b: what the key-0 knockout does to the loss (docs/science.md, version 3
item 7): the change of next-token loss when key 0 is knocked out in every layer, and in the
sink heads only, against control knockouts (key 1, and a random earlier key of key 0's mass,
the latter also in the sink heads only). On a corpus that marks its copy targets (backcopy)
the change is split into copy targets and the others: a sink that parks a head idle matters
for the queries that do not copy."""

from __future__ import annotations

import torch

from posleak.analysis import measures
from posleak.analysis.collect import stream
from posleak.analysis.records import finite_mean
from posleak.analysis.stages._hooks import on_heads
from posleak.analysis.stages._loss import record_change, target_groups
from posleak.analysis.stages.base import RUN, Stage
from posleak.analysis.stats import bootstrap_weights


class KnockoutLoss(Stage):
    def work(self, analysis) -> int:
        return 2 * analysis.opts.seqs * analysis.T  # two rules in the sink heads

    def enabled(self, opts) -> bool:
        return opts.knockout

    def run(self, analysis, ctx) -> None:
        tokens = torch.cat([ctx.tokens, ctx.targets[:, -1:]], dim=1)  # (N, T + 1)
        groups = target_groups(analysis.subject.copy_targets, tokens)
        base = ctx.base.losses
        heads = sink_heads(analysis, ctx)
        analysis.rec.add("knockout_sink_heads", sum(len(h) for h in heads.values()))
        keys = measures.random_earlier_keys(analysis.T, analysis.window, analysis.subject.seed)
        rules = {
            "key=0": measures.knock_out_key0,
            "key=1": lambda p: measures.knock_out_key(p, 1),
            "key=random": lambda p: measures.knock_out_equal_mass(p, keys),
        }
        delta = {}
        for label, rule in rules.items():
            delta[label] = ctx.losses[label] - base  # the knockout stage's passes, every layer
            if heads and label != "key=1":
                hooks = [(f"blocks.{l}.attn.pattern", on_heads(rule, h)) for l, h in heads.items()]
                knocked = stream(analysis.model, ctx.tokens, {}, analysis.batch, hooks, ctx.targets)
                delta[label + ",heads=sinks"] = knocked - base
        delta["excess"] = delta["key=0"] - delta["key=random"]  # paired per token
        if heads:
            delta["excess,heads=sinks"] = (
                delta["key=0,heads=sinks"] - delta["key=random,heads=sinks"]
            )
        weights = bootstrap_weights(len(tokens), analysis.opts.bootstrap, seed=5)
        for label, change in delta.items():
            for group, mask in groups.items():
                record_change(
                    analysis,
                    "knockout_loss_change",
                    f"{label},targets={group}",
                    change,
                    mask,
                    weights,
                )
        by_query = delta["key=0"].mean(0)
        for i in range(analysis.T):
            analysis.rec.add("knockout_loss_change_by_query", by_query[i], query=i)

    def headline(self, rows, layers, opts) -> dict:
        change = {r["condition"]: r["value"] for r in rows if r["metric"] == "knockout_loss_change"}
        group = "other" if any(c.endswith("targets=other") for c in change) else "all"
        out = {}
        for label, key in KEYS:
            out[key] = change.get(f"{label},targets={group}")
        heads = [r["value"] for r in rows if r["metric"] == "knockout_sink_heads"]
        out["knockout_sink_heads"] = finite_mean(heads)
        return out

    def headlines(self, opts, summaries) -> list:
        targets = "non-copy targets on a copy corpus, else all"
        return [
            (key, f"loss change, {text} ({targets}; nats)")
            for (label, key), text in zip(KEYS, KEY_TEXT, strict=True)
        ] + [("knockout_sink_heads", "sink heads (α₀ > ε and λ₀ ≥ lift), all layers")]


KEYS = (
    ("key=0", "knockout_loss_key0"),
    ("key=random", "knockout_loss_random"),
    ("excess", "knockout_loss_excess"),
    ("key=0,heads=sinks", "knockout_loss_sinks"),
    ("excess,heads=sinks", "knockout_loss_sinks_excess"),
)
KEY_TEXT = (
    "key-0 knockout in every layer",
    "equal-mass random-key control",
    "key 0 minus the equal-mass control",
    "key-0 knockout in the sink heads only",
    "the same minus its equal-mass control in those heads",
)


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
    name="knockout loss",
    order=55,
    reads=("blocks.{l}.attn.pattern",),
    metrics={
        m: RUN
        for m in ("knockout_loss_change", "knockout_loss_change_by_query", "knockout_sink_heads")
    },
)
