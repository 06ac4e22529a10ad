"""Measurement 6: the key-0 knockout (docs/science.md): A_i0 set to 0 for i >= 1 and the row
renormalised, in every layer at once (and one layer at a time when asked); what it removes
of C_res and C_mask downstream, and the original probe on the knocked-out states."""

from __future__ import annotations

import torch

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.records import by_layer
from posleak.analysis.maths import content, measures
from posleak.analysis.maths.logits import PARTS
from posleak.analysis.reports import plots
from posleak.analysis.stages._removal import record_probes, record_removal
from posleak.analysis.stages.base import ATTN, RESID, RUN, Bench, Context, Section, Stage


class Knockout(Stage):
    def work(self, analysis: Bench) -> int:
        passes = 3 + (analysis.L if analysis.opts.knockout_per_layer else 0)
        return passes * analysis.opts.seqs * analysis.T

    def enabled(self, opts) -> bool:
        return opts.knockout

    def run(self, analysis: Bench, ctx: Context) -> None:
        per_layer = list(range(analysis.L)) if analysis.opts.knockout_per_layer else []
        for target in per_layer:
            knock_out(analysis, ctx, target)
        T = analysis.T
        random = measures.random_earlier_keys(T, analysis.window, analysis.subject.seed)
        rules = {  # key 0 in every layer, and the controls: key 1, a random earlier key
            0: (lambda pattern, name: measures.knock_out_key0(pattern), torch.zeros(T).long()),
            1: (lambda pattern, name: measures.knock_out_key(pattern, 1), torch.ones(T).long()),
            "random": (lambda p, name: measures.knock_out_random_key(p, random), random),
        }
        for key, (rule, keys) in rules.items():
            moved = [[] for _ in range(analysis.L)]
            where = Destination(analysis.L) if key == 0 else None
            extra = where.hooks(analysis.L) if where else []
            knock_out(analysis, ctx, "all", measuring(rule, keys, moved, key, where), key, extra)
            if where:
                where.record(analysis)
            per_layer_mass = [torch.cat(m).mean() for m in moved]
            for l, mass in enumerate(per_layer_mass):
                analysis.rec.add("moved_mass", mass, layer=l, condition={"key": key})
            analysis.rec.add(
                "moved_mass", torch.stack(per_layer_mass).mean(), condition={"key": key}
            )

    def per_layer(self, rows, opts) -> dict:
        out = {}
        for key, suffix in ((0, ""), (1, "_key1")):
            for metric in ("knockout_probe_r2_log", "knockout_probe_refit_r2_log"):
                out[metric + suffix] = by_layer(
                    rows, metric, condition={"layer": "all", "key": key}
                )
        return out

    def figures(self, groups, out, opts) -> dict:
        draw = lambda ax: plots.knockout_curve(ax, groups)  # noqa: E731
        return {"knockout": plots.figure(out / "knockout", draw)}

    def sections(self, opts) -> list:
        return [Section("Key-0 knockout", ("knockout",))]


def measuring(rule, keys: torch.Tensor, moved: list, key, where=None):
    """A knockout hook that also keeps, per layer, the attention it takes off its key (key 1's
    rule leaves query 1 alone, so its first query is left out of the mass), and hands the
    patterns before and after to `where` (a Destination) when given."""

    def hook(pattern, name):
        layer = int(name.split(".")[1])
        mass = measures.knocked_mass(pattern, keys)
        moved[layer].append((mass[..., 1:] if key == 1 else mass).detach().double().flatten())
        after = rule(pattern, name)
        if where is not None:
            where.attention(layer, pattern, after)
        return after

    return hook


class Destination:
    """Where the key-0 knockout's mass goes (version 4: a knockout says so). Per head, the key
    j >= 1 with the most attention after the knockout (mean over queries and sequences) and
    its mass before and after; per residual site, the position j >= 1 whose norm stands out
    most after the knockout (||x_j|| / median_i ||x_i||, mean over sequences; the intact
    model's is `massive_ratio_rest`): a model that builds a new sink elsewhere (SmolLM2 moves
    its own to position 1) shows it here."""

    def __init__(self, n_layer: int):
        self.before = [0.0] * n_layer  # per layer: (H, T) summed mean-over-queries mass
        self.after = [0.0] * n_layer
        self.ratio = [0.0] * n_layer  # per layer: (T,) summed norm ratio
        self.seqs = [0] * n_layer

    def attention(self, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        self.before[layer] = self.before[layer] + before.double().mean(-2).sum(0).cpu()
        self.after[layer] = self.after[layer] + after.double().mean(-2).sum(0).cpu()

    def hooks(self, n_layer: int) -> list:
        """Read-only hooks on every layer's output, for the norm ratio of every position."""

        def norms(resid, name):
            layer = int(name.split(".")[1])
            self.ratio[layer] = self.ratio[layer] + measures.position_ratios(resid).sum(0).cpu()
            self.seqs[layer] += len(resid)

        return [(f"blocks.{l}.resid_post", norms) for l in range(n_layer)]

    def record(self, analysis) -> None:
        add = analysis.rec.add
        for l in range(analysis.L):
            n = self.seqs[l]
            after, before = self.after[l][:, 1:] / n, self.before[l][:, 1:] / n
            for h in range(analysis.H):
                j = int(after[h].argmax())
                cond = {"key": 0}
                add("knockout_top_key", j + 1, layer=l, head=h, condition=cond)
                add("knockout_top_key_mass", after[h, j], layer=l, head=h, condition=cond)
                add("knockout_top_key_mass_intact", before[h, j], layer=l, head=h, condition=cond)
            ratio = self.ratio[l] / n
            j = int(ratio[1:].argmax()) + 1  # position 0's own state is not knocked out
            cond = {"key": 0, "position": j}
            add("knockout_massive_ratio", ratio[j], layer=l + 1, condition=cond)  # its site


def knock_out(analysis, ctx, target, hook=None, control: int | str = 0, extra=()) -> None:
    """The key-0 knockout (or a control `hook` of that shape, of key `control`) in one
    layer (an int) or in every layer ("all"): what it removes of C_res and C_mask, the
    original probes' transfer R^2, and the R^2 of probes refit on the knocked-out states.
    In every layer, the pass also keeps the loss of every position in ctx.losses. `extra`:
    read-only hooks that watch the same pass."""
    layers = range(analysis.L) if target == "all" else [target]
    hooks = [(f"blocks.{l}.attn.pattern", hook or _knockout) for l in layers] + list(extra)
    every = target == "all"  # the loss stage reads these passes' losses (knockout_loss.py)
    targets = ctx.targets if every else None
    knocked = analysis.measure(ctx.tokens, hooks, fitted=ctx.fitted, targets=targets)
    if every:
        ctx.losses[losses_label(control)] = knocked.losses
    label = {"layer": target, "key": control}
    record_removal(analysis, "knockout", label, ctx.base, knocked)
    record_probes(analysis, "knockout", label, knocked)


def transfer_drop(layers: dict) -> float | None:
    """The original probe's transfer R² at the last site, intact minus knocked out (None where
    a probe's R² is undefined: a constant target)."""
    intact, knocked = layers["probe_r2_log"], layers["knockout_probe_r2_log"]
    if not (knocked and intact):
        return None
    last = intact[max(intact)], knocked[max(knocked)]
    return None if None in last else last[0] - last[1]


def _knockout(pattern, name):
    return measures.knock_out_key0(pattern)


STAGE = Knockout(
    needs=("probe",),
    name="key-0 knockout",
    order=50,
    metrics={
        "knockout_removed": ATTN,
        "knockout_removed_c_mask": ATTN,
        "knockout_probe_r2_log": RESID,
        "knockout_probe_refit_r2_log": RESID,
        "knockout_removed_v3": RUN,
        "moved_mass": ATTN,
        "knockout_removed_share": RUN,
        "knockout_top_key": ATTN,
        "knockout_top_key_mass": ATTN,
        "knockout_top_key_mass_intact": ATTN,
        "knockout_massive_ratio": RESID,
    },
    numbers=(
        Reported(
            "moved_mass",
            "attention a knockout of key {key} moves (mean over queries, heads, layers)",
            conditions={"key": (0, 1, "random")},
        ),
        Reported(
            "knockout_probe_refit_r2_log_last",
            "probe R² refit after key-0 knockout (last layer): position left",
            unit="R²",
            curve="knockout_probe_refit_r2_log",
            reduce="last",
        ),
        Reported(
            "knockout_probe_refit_r2_log_key1_last",
            "the same after the key-1 control knockout",
            unit="R²",
            curve="knockout_probe_refit_r2_log_key1",
            reduce="last",
        ),
        Reported(
            "knockout_probe_r2_log_drop",
            "transfer R² drop by key-0 knockout (original probe; unbounded)",
            compute=lambda rows, layers, opts, condition: transfer_drop(layers),
        ),
        Reported(
            "knockout_removed_v3",
            "C_res removed by knocking out key {key} in every layer, part {part}, "
            "i < {early_queries}, layers ≥ 1 (v3)",
            unit="share",
            conditions={"key": (0, 1), "part": PARTS},
            where={"layer": "all"},
        ),
        Reported(
            "knockout_removed_share",
            "removed by knocking out key {key} in every layer, {part} part, "
            "i < {early_queries}, layers ≥ 1",
            unit="share",
            conditions={"key": (0, 1, "random"), "part": content.PARTS},
            where={"layer": "all"},
        ),
    ),
)


def losses_label(key) -> str:
    """The label in ctx.losses of the pass that knocked `key` out in every layer (the knockout
    loss stage reads it rather than run the pass again)."""
    return f"key={key}"
