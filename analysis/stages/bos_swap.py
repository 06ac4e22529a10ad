"""Measurement 6: BOS replacement (docs/science.md): the position-0 embedding is overwritten
before the forward pass (frequency-weighted mean embedding, most frequent token, a random
vector of BOS's norm, zeros), and the share of the early-query residual component that is
removed is measured (version 4: per part, content keys and key 0, over layers >= 1), with
controls (C_mask, the original probe's transfer R^2), the probe refit on the swapped states
and the change of next-token loss.

For the replacements in `swap_family` the swap family follows: only BOS's key, or only its
value, replaced in every layer by the one the replaced embedding gives (which route the effect
takes; version 4 says layers >= 1, but then a two-layer model's routes cannot reach the
logits the share reads, and key and value together would not be the whole replacement), and
the position control: the same embedding written at a random position p >= 1 instead of 0
(is it BOS that matters, or any token replaced)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import by_layer, removed_over_layers
from posleak.analysis.maths import content, measures
from posleak.analysis.maths.logits import PARTS
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.reports import plots
from posleak.analysis.stages._loss import record_change
from posleak.analysis.stages._removal import record_probes, record_removal, record_removal_v4
from posleak.analysis.stages.base import ATTN, RESID, RUN, Bench, Context, Section, Stage


class BosSwap(Stage):
    def work(self, analysis: Bench) -> int:
        opts = analysis.opts
        family = len(ROUTES) + 1  # passes per replacement in the family
        return (len(opts.swaps) + family * len(in_family(opts))) * opts.seqs * analysis.T

    def enabled(self, opts) -> bool:
        return bool(opts.swaps)

    def run(self, analysis: Bench, ctx: Context) -> None:
        base_loss = ctx.base.losses
        k = min(analysis.opts.early_queries, analysis.T)
        everywhere = torch.ones_like(base_loss, dtype=torch.bool)
        early = everywhere.clone()
        early[:, k:] = False
        groups = {"all": everywhere, "early": early}  # early: queries i < k
        weights = bootstrap_weights(len(base_loss), analysis.opts.bootstrap, seed=7)

        def measured(label: dict, hooks: list, v3: bool):
            done = analysis.measure(ctx.tokens, hooks, fitted=ctx.fitted, targets=ctx.targets)
            for group, mask in groups.items():
                change = done.losses - base_loss
                condition = {**label, "queries": group}
                record_change(analysis, "bos_swap_loss_change", condition, change, mask, weights)
            if v3:
                record_removal(analysis, "bos_swap", label, ctx.base, done)
            else:
                record_removal_v4(analysis, "bos_swap", label, ctx.base, done)
            record_probes(analysis, "bos_swap", label, done)
            return done

        for kind in analysis.opts.swaps:
            vector = replacement(analysis, kind, ctx.tokens)
            swapped = measured({"swap": kind}, [("embed", embedding_at(vector, None))], v3=True)
            for l in range(analysis.L):
                signal = swapped.logits[l].signal.mean(-2)  # pooled over heads
                for i in range(analysis.T):
                    analysis.rec.add(
                        "c_res",
                        measures.c_res(signal[i]),
                        layer=l,
                        query=i,
                        condition={"swap": kind},
                    )
            if kind not in in_family(analysis.opts):
                continue
            donor = position0_states(analysis.model, vector, analysis.L)
            for route in ROUTES:
                hooks = route_hooks(donor, route, range(analysis.L))
                measured({"swap": kind, "route": route}, hooks, v3=False)
            at = control_positions(len(ctx.tokens), k, analysis.subject.seed)
            hooks = [("embed", embedding_at(vector, at))]
            measured({"swap": kind, "at": "random"}, hooks, v3=False)

    def per_layer(self, rows, opts) -> dict:
        k = opts.early_queries
        return {
            f"bos_swap_removed_{kind}_k{k}": by_layer(
                rows, "bos_swap_removed", condition={"swap": kind, "k": k}
            )
            for kind in opts.swaps
        }

    def figures(self, groups, out, opts) -> dict:
        ks = (*opts.early_k, None)
        return {"swap": plots.swap_bars(out / "bos_swap", groups, ks, opts.swaps)}

    def sections(self, opts) -> list:
        return [Section("BOS replacement", ("swap",))]


def in_family(opts) -> list[str]:
    """The replacements that get the swap family: those of `swaps` that `swap_family` names."""
    return [kind for kind in opts.swaps if kind in opts.swap_family]


ROUTES = ("key", "value")  # the swap family: BOS's key only, or its value only
HOOK_OF_ROUTE = {"key": "k", "value": "v"}


class SwapPass(NamedTuple):
    """One pass of a replacement's family as reports name it: its label (formatted with the
    replacement), its removed share and loss change numbers, and the condition fields those
    add to {swap, part} / {swap, queries}."""

    label: str
    share: str
    loss: str
    condition: dict


PASSES = {
    "whole": SwapPass("BOS → {kind}", "bos_swap_removed_share", "bos_swap_loss_change", {}),
    "key": SwapPass(
        "BOS's key only → {kind}'s",
        "bos_swap_route_removed_share",
        "bos_swap_route_loss_change",
        {"route": "key"},
    ),
    "value": SwapPass(
        "BOS's value only → {kind}'s",
        "bos_swap_route_removed_share",
        "bos_swap_route_loss_change",
        {"route": "value"},
    ),
    "control": SwapPass(
        "{kind} at a random position (control)",
        "bos_swap_control_removed_share",
        "bos_swap_control_loss_change",
        {},
    ),
}


def embedding_at(vector: torch.Tensor, at: torch.Tensor | None):
    """An embed hook writing `vector` at position 0 of every sequence (`at` None), or at
    position at[r] of sequence r. Sequences arrive in order, a batch at a time (collect.stream's
    contract), so the hook counts them to know which rows it holds."""
    seen = 0

    def swap(embed, name):
        nonlocal seen
        embed = embed.clone()
        rows = torch.arange(len(embed))
        if at is None:
            where = torch.zeros(len(embed), dtype=torch.long)
        else:
            where = at[seen : seen + len(embed)]
            if len(where) != len(embed):
                raise RuntimeError(f"{name}: more sequences than the {len(at)} positions given")
        embed[rows, where] = vector.to(embed.device, embed.dtype)
        seen += len(embed)
        return embed

    return swap


def position0_states(model, vector: torch.Tensor, n_layer: int) -> dict:
    """{hook name: (H, d_head)}: position 0's key and value in every layer when its embedding
    is `vector`. Position 0 sees only itself, so they are the same in every sequence and a
    one-token pass gives them."""
    names = [f"blocks.{l}.attn.{x}" for l in range(n_layer) for x in HOOK_OF_ROUTE.values()]
    one = torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    with model.hooks([("embed", embedding_at(vector, None))]):
        _, cache = model.run_with_cache(one, names=names)
    return {name: cache[name][0, :, 0] for name in names}


def route_hooks(donor: dict, route: str, layers) -> list:
    """Hooks that put the donor's position-0 key (route "key") or value ("value") in place of
    position 0's own in the given layers, everything else as it was."""

    def put(tensor, name):
        out = tensor.clone()
        out[:, :, 0] = donor[name].to(out.device, out.dtype)
        return out

    return [(f"blocks.{l}.attn.{HOOK_OF_ROUTE[route]}", put) for l in layers]


def control_positions(n: int, early: int, seed: int) -> torch.Tensor:
    """The position control's p per sequence: uniform on 1 <= p <= early / 2, so that at least
    half of the early queries 1 <= i < early see the replaced token (seeded)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(1, max(1, early // 2) + 1, (n,), generator=gen)


def replacement(analysis, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """The vector that replaces the position-0 embedding (science.md, measurement 5), on the
    scale the first layer sees (Gemma multiplies its embeddings by sqrt(d_model))."""
    embed = analysis.model.embed_tokens
    table = embed.weight.detach().float().cpu() * float(getattr(embed, "embed_scale", 1.0))
    body = tokens[:, 1:].flatten()
    if kind == "mean":  # frequency-weighted over the tokens that occur in the data
        counts = body.bincount(minlength=len(table)).to(table.dtype)
        return counts @ table / counts.sum()
    if kind == "token":  # the most frequent token of the analysed text
        return table[int(body.bincount().argmax())]
    first = table[tokens[:, 0]].mean(0)
    if kind == "random":
        gen = torch.Generator().manual_seed(analysis.subject.seed)
        v = torch.randn(table.shape[1], generator=gen, dtype=table.dtype)
        return v * first.norm() / v.norm()
    if kind == "zeros":
        return torch.zeros_like(first)
    raise ValueError(f"unknown BOS replacement {kind!r}; choose from mean, token, random, zeros")


STAGE = BosSwap(
    needs=("probe",),
    name="BOS replacements",
    order=40,
    metrics={
        "bos_swap_removed": ATTN,
        "bos_swap_removed_c_mask": ATTN,
        "bos_swap_probe_r2_log": RESID,
        "bos_swap_probe_refit_r2_log": RESID,
        "bos_swap_removed_v3": RUN,
        "bos_swap_removed_share": RUN,
        "bos_swap_loss_change": RUN,
    },
    numbers=(
        Reported(
            "bos_swap_removed",
            "C_res² removed by BOS→{swap}, i < {early_queries} (v2)",
            unit="share",
            conditions={"swap": "swaps"},
            compute=lambda rows, layers, opts, c: removed_over_layers(
                rows, c["swap"], opts.early_queries
            ),
        ),
        Reported(
            "bos_swap_removed_v3",
            "removed by BOS→{swap}, part {part}, i < {early_queries}, layers ≥ 1 (v3)",
            unit="share",
            conditions={"swap": "swaps", "part": PARTS},
        ),
        Reported(
            "bos_swap_loss_change",
            "loss change by BOS→{swap}, queries: {queries}",
            unit="nats",
            conditions={"swap": "swaps", "queries": ("all", "early")},
        ),
        Reported(
            "bos_swap_removed_share",
            "removed by BOS→{swap}, {part} part, i < {early_queries}, layers ≥ 1",
            unit="share",
            conditions={"swap": "swaps", "part": content.PARTS},
        ),
        Reported(
            "bos_swap_route_removed_share",
            "removed by BOS's {route} only → {swap}'s, {part} part, i < {early_queries}, "
            "layers ≥ 1",
            unit="share",
            metric="bos_swap_removed_share",
            conditions={"swap": in_family, "route": ROUTES, "part": content.PARTS},
        ),
        Reported(
            "bos_swap_route_loss_change",
            "loss change by BOS's {route} only → {swap}'s, queries: {queries}",
            unit="nats",
            metric="bos_swap_loss_change",
            conditions={"swap": in_family, "route": ROUTES, "queries": ("all", "early")},
        ),
        Reported(
            "bos_swap_control_removed_share",
            "removed by {swap} at a random position 1 ≤ p ≤ {early_queries}/2 (position "
            "control), {part} part, i < {early_queries}, layers ≥ 1",
            unit="share",
            metric="bos_swap_removed_share",
            conditions={"swap": in_family, "part": content.PARTS},
            where={"at": "random"},
        ),
        Reported(
            "bos_swap_control_loss_change",
            "loss change by {swap} at a random position (position control), queries: {queries}",
            unit="nats",
            metric="bos_swap_loss_change",
            conditions={"swap": in_family, "queries": ("all", "early")},
            where={"at": "random"},
        ),
    ),
)
