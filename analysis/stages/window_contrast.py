"""Version 3, item 4: where a window binds. Claim (a) is about queries beyond the window, so
a window-vs-full contrast reads only queries i >= w, on the window's pairs (j > i - w) in both
models: the two-way fit and the split-half signal on that pair set, pooled over heads and over
layers >= 1 and clamped once; abs_share on the same pairs; and the position probe refit on
positions >= w only. A full-attention model is analysed with its comparator's w
(Options.contrast_window); a windowed one with its own. A hybrid model (Gemma 3: window
layers and global layers) holds the contrast inside itself: its window layers against its
global layers on the same pairs, paired over the same bootstrap replicates of sequences."""

from __future__ import annotations

from typing import NamedTuple

import torch

from posleak.analysis.engine.collect import stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.maths import measures
from posleak.analysis.maths import probe as probes
from posleak.analysis.maths.logits import logit_stats, pooled
from posleak.analysis.maths.stats import percentile_interval
from posleak.analysis.stages.base import ATTN, RESID, RUN, Bench, Context, Stage


def contrast_window(analysis) -> int | None:
    """The w of the contrast: the option, else the model's window; None when no window binds
    within the analysed length (w must leave at least two queries beyond it)."""
    w = analysis.opts.contrast_window or analysis.window
    return w if w is not None and w < analysis.T - 1 else None


def beyond_window(visible: torch.Tensor, w: int) -> torch.Tensor:
    """(T, T) mask of the visible pairs (i, j) with i >= w and i - j < w."""
    T = visible.shape[0]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return visible & (i >= w) & (i - j < w)


class WindowStats(NamedTuple):
    signal: torch.Tensor  # () signed split-half signal, mean over queries i >= w, heads pooled
    boot: torch.Tensor  # (R,) its bootstrap replicates
    null: torch.Tensor  # (R,) its sign-flip replicates: what noise alone gives at this N
    share_num: float  # abs_share's numerator and denominator on the same pairs
    share_den: float


def window_stats(sums, w: int, boot_a, boot_b) -> WindowStats:
    """The residual-stream component of one layer at queries i >= w, from a two-way fit on
    the window's pairs there (the same pair set whichever model the sums come from)."""
    pairs = beyond_window(sums.visible, w)
    st = logit_stats(sums.restrict(pairs), measures.two_way_design(pairs), boot_a, boot_b)
    return WindowStats(
        pooled(st.signal)[w:].mean(),
        pooled(st.signal_boot)[:, w:].mean(-1),
        pooled(st.signal_null)[:, w:].mean(-1),
        float(st.share_num.sum()),
        float(st.share_den.sum()),
    )


class WindowContrast(Stage):
    def work(self, analysis: Bench) -> int:
        return analysis.opts.seqs * analysis.T if contrast_window(analysis) else 0

    def run(self, analysis: Bench, ctx: Context) -> None:
        w = contrast_window(analysis)
        if w is None:
            return
        add, n, cond = analysis.rec.add, analysis.opts.seqs, {"w": w}
        signals, boots, nulls, num, den = [], [], [], 0.0, 0.0  # layers >= 1
        by_layer = [window_stats(s, w, analysis.boot_a, analysis.boot_b) for s in ctx.base.sums]
        for l, st in enumerate(by_layer):
            add("c_res_window_signed", st.signal, layer=l, condition=cond, std=st.boot.std(), n=n)
            if l >= 1:
                signals.append(st.signal)
                boots.append(st.boot)
                nulls.append(st.null)
                num, den = num + st.share_num, den + st.share_den
        if signals:  # signed means over layers >= 1, clamped once
            clamp = measures.clamp_once
            lo, hi = percentile_interval(torch.stack(boots).mean(0))
            value = clamp(torch.stack(signals).mean())
            add("c_res_window", value, condition=cond, lo=clamp(lo), hi=clamp(hi), n=n)
            floor = torch.quantile(clamp(torch.stack(nulls).mean(0)), 0.95)
            add("c_res_window_floor", floor, condition=cond, n=n)
            add("abs_share_window", num / den, condition=cond, n=n)
        windowed = [analysis.windows[l] is not None for l in range(1, analysis.L)]
        if any(windowed) and not all(windowed):  # a hybrid: window layers against global ones
            record_hybrid(analysis, cond, by_layer[1:], windowed)
        for site, r2 in enumerate(tail_probe(analysis, ctx.tokens, w)):
            add("probe_tail_r2_log", r2, layer=site, condition=cond, n=n // 2)


class HybridContrast(NamedTuple):
    window: tuple  # (signed mean, bootstrap replicates) over the window layers
    full: tuple  # the same over the global layers
    diff: torch.Tensor  # () window layers minus global layers, signed
    diff_boot: torch.Tensor  # (R,) its replicates, paired: every layer shares the resampling


def hybrid_contrast(layer_stats: list[WindowStats], windowed: list[bool]) -> HybridContrast:
    """Inside one model: the signed split-half signal at i >= w on the window's pairs, averaged
    over its window layers and over its global layers, and their difference. The layers read
    the same sequences, so the bootstrap replicates (the same resampling in every layer) pair
    the difference; nothing is clamped before it is taken."""

    def mean_of(want: bool) -> tuple:
        chosen = [st for st, w in zip(layer_stats, windowed, strict=True) if w == want]
        signal = torch.stack([st.signal for st in chosen]).mean()
        return signal, torch.stack([st.boot for st in chosen]).mean(0)

    window, full = mean_of(True), mean_of(False)
    return HybridContrast(window, full, window[0] - full[0], window[1] - full[1])


def record_hybrid(analysis, cond: str, layer_stats: list[WindowStats], windowed: list) -> None:
    """The hybrid's contrast by layer type (clamped once for reading) and their signed
    difference with its paired bootstrap interval (layers >= 1)."""
    add, n = analysis.rec.add, analysis.opts.seqs
    found = hybrid_contrast(layer_stats, windowed)
    for kind, (signal, boot) in (("window", found.window), ("global", found.full)):
        lo, hi = percentile_interval(boot)
        clamp = measures.clamp_once
        add("c_res_window_type", clamp(signal), condition={**cond, "layers": kind}, lo=clamp(lo),
            hi=clamp(hi), n=n)  # fmt: skip
    lo, hi = percentile_interval(found.diff_boot)
    add("c_res_window_hybrid_diff", found.diff, condition=cond, lo=lo, hi=hi, n=n,
        std=found.diff_boot.std())  # fmt: skip


def tail_probe(analysis, tokens: torch.Tensor, w: int) -> list[float]:
    """Per residual site: R^2 (log target) on half B of a probe fitted on half A, both on
    positions >= w only: what position is decodable where the window binds."""
    T, d = analysis.T, analysis.model.cfg.d_model
    positions = torch.arange(w, T)
    halves = [  # per site: half A (folded, for the ridge's cross-validation), half B
        [probes.ProbeData(d, analysis.opts.probe_folds), probes.ProbeData(d, 1)]
        for _ in analysis.resid_names
    ]

    def collector(site: int):
        def consume(resid, rows):
            for half, data in enumerate(halves[site]):
                mine = rows % 2 == half
                x = resid[mine, w:]
                groups = (rows[mine] // 2).repeat_interleave(len(positions))
                data.add(x.reshape(-1, d), positions.repeat(len(x)), groups)

        return consume

    consumers = {name: collector(site) for site, name in enumerate(analysis.resid_names)}
    stream(analysis.model, tokens, consumers, analysis.batch)
    return [probes.r2_of_moments(a.fit("log"), b) for a, b in halves]


STAGE = WindowContrast(
    name="window contrast",
    order=25,
    metrics={
        "c_res_window_signed": ATTN,
        "c_res_window": RUN,
        "c_res_window_floor": RUN,
        "abs_share_window": RUN,
        "probe_tail_r2_log": RESID,
        "c_res_window_type": RUN,
        "c_res_window_hybrid_diff": RUN,
    },
    numbers=(
        Reported(
            "c_res_window",
            "C_res at queries i ≥ w on the window's pairs, layers ≥ 1 (v3)",
            parameters=("w",),
        ),
        Reported(
            "c_res_window_floor",
            "its no-signal floor at this N (95% of sign flips)",
            parameters=("w",),
        ),
        Reported("abs_share_window", "abs_share on the same pairs, layers ≥ 1", parameters=("w",)),
        Reported(
            "c_res_window_signed_mean",
            "signed C² at queries i ≥ w on the window's pairs, mean over layers ≥ 1",
            metric="c_res_window_signed",
            reduce="mean_from_1",
            parameters=("w",),
        ),
        Reported(
            "probe_tail_r2_log_last",
            "probe R² at positions ≥ w (last layer, refit)",
            unit="R²",
            metric="probe_tail_r2_log",
            reduce="last",
            parameters=("w",),
        ),
        Reported(
            "c_res_window_hybrid_diff",
            "hybrid model: signed C_res² at i ≥ w, window layers − global layers (v3)",
            parameters=("w",),
        ),
    ),
)
