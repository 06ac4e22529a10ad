"""Version 4, measurement 3: the light cone (claim a). Under a window of w keys a query i >= w
sees neither key 0 nor a shorter row than any other, so position reaches it only through the
residual stream, one window per layer: the stream entering layer l (site l; 0 = the
embeddings) can carry position at i only if i <= l (w - 1), and attention layer l, whose keys
reach w - 1 further back, only if i <= (l + 1)(w - 1).

Queries are cut into bands [k w, (k + 1) w). Per band:
- the band probe: a ridge probe x_i -> i fitted on half A within the band and scored on half B
  within it (R², 95% bootstrap interval over held-out sequences);
- band C_content_res: version 4's content part (keys j >= 1, key 0 out of the fit) of a
  two-way fit over the window's pairs (i - j < w), signed, mean over the band's queries and
  the heads, with its bootstrap SE and a floor.
A layer's frontier is its last band above the floor. One floor per band would put noise's
frontier beyond the cone in most layers (with 15 bands, 1 - 0.95^15 = 54%), so the floor is
family-wise over a layer's bands: for C_content_res the 95% quantile of the largest
sign-flip null over the bands (each band scaled by its null's spread); for the probe a band is
above its floor when its one-sided bootstrap lower bound at 5% / (number of bands) exceeds 0.
A full-attention model is cut into the bands of its comparator's window (Options.contrast_window).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from posleak.analysis.engine.collect import stream
from posleak.analysis.engine.numbers import Reported
from posleak.analysis.maths import content
from posleak.analysis.maths import probe as probes
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.reports import plots
from posleak.analysis.stages.base import ATTN, RESID, Bench, Context, Section, Stage
from posleak.analysis.stages.window_contrast import contrast_window

LEVEL = 0.05  # family-wise, over one layer's bands
PROBE_MEMORY = 1 << 30  # bytes of probe moments above which band probes are skipped


def bands(T: int, w: int) -> list[range]:
    """The query bands [k w, (k + 1) w) of a length-T sequence (the last may be shorter)."""
    return [range(start, min(start + w, T)) for start in range(0, T, w)]


def cone_band(layer: int, w: int, site: str) -> int:
    """The last band the light cone reaches: at residual site l, queries i <= l (w - 1); at
    attention layer l, i <= (l + 1)(w - 1)."""
    reach = layer if site == RESID else layer + 1
    return reach * (w - 1) // w


def frontier(above: list[bool]) -> int:
    """The last band above its floor; -1 when none is."""
    return max((k for k, is_above in enumerate(above) if is_above), default=-1)


def slope(values: dict) -> float | None:
    """Least-squares slope of values {layer: value} over layers (None with fewer than two)."""
    if len(values) < 2:
        return None
    x = np.array(list(values), dtype=float)
    y = np.array(list(values.values()), dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def familywise_floors(nulls: torch.Tensor) -> torch.Tensor:
    """Per band, the floor whose exceedance by noise in any band of the family has probability
    LEVEL: nulls (R, K) sign-flip replicates of each band's statistic, scaled by their spread,
    maximised over bands, and the (1 - LEVEL) quantile scaled back."""
    spread = nulls.std(0)
    safe = torch.where(spread > 0, spread, 1.0)
    top = (nulls / safe).amax(1)
    return torch.quantile(top, 1 - LEVEL) * spread


class BandContent(NamedTuple):
    """Band C_content_res of one layer: per band the signed value, its bootstrap SE and 95%
    interval and its family-wise floor; the frontier; and the signed mean over every query
    i >= w (heads pooled) with its SE."""

    value: list
    se: list
    lo: list
    hi: list
    floor: list
    frontier: int
    beyond: float
    beyond_se: float


def band_content(sums, w: int, boot_a, boot_b, early: int) -> BandContent:
    """Version 4's content part of one layer's accumulated logits (a LogitSums) on the
    window's pairs (i - j < w), by query band of width w (query 0 sees no content key)."""
    T = sums.visible.shape[0]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    split = content.content_split(sums.restrict(sums.visible & (i - j < w)), boot_a, boot_b, early)
    signal, boot, null = (t.mean(-2) for t in content.parts_of(split)["content"])  # heads
    queries = [torch.tensor([q for q in band if q >= 1]) for band in bands(T, w)]
    value = torch.stack([signal[q].mean() for q in queries])
    reps = torch.stack([boot[:, q].mean(-1) for q in queries], 1)  # (R, K)
    floor = familywise_floors(torch.stack([null[:, q].mean(-1) for q in queries], 1))
    lo, hi = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=reps.dtype), dim=0)
    beyond = torch.arange(w, T)
    return BandContent(
        value.tolist(),
        reps.std(0).tolist(),
        lo.tolist(),
        hi.tolist(),
        floor.tolist(),
        frontier((value > floor).tolist()),
        float(signal[beyond].mean()),
        float(boot[:, beyond].mean(-1).std()),
    )


class BandProbeResult(NamedTuple):
    bands: list  # per band (R², 2.5%, 97.5%), (None, None, None) where it has < 2 positions
    frontier: int


class BandProbes:
    """One residual site's band probes: x_i -> i within each band, fitted on the rows of
    half A, scored on those of half B (Scorer's rows index half B's sequences)."""

    def __init__(self, d: int, cuts: list[range], start: int, folds: int):
        self.d = d
        self.spans = [range(max(band.start, start), band.stop) for band in cuts]
        self.moments = [probes.ProbeData(d, folds) if len(s) >= 2 else None for s in self.spans]
        self.scorers: list = []

    def fit_rows(self, resid: torch.Tensor, rows: torch.Tensor) -> None:
        for span, moments in zip(self.spans, self.moments, strict=True):
            if moments is not None:
                x = resid[:, span.start : span.stop]
                positions = torch.arange(span.start, span.stop).repeat(len(x))
                moments.add(x.reshape(-1, self.d), positions, rows.repeat_interleave(len(span)))

    def fit(self, n_scored: int) -> None:
        self.scorers = [
            probes.Scorer(m.fit("linear"), torch.arange(s.start, s.stop), n_scored)
            if m is not None else None
            for s, m in zip(self.spans, self.moments, strict=True)
        ]  # fmt: skip

    def score_rows(self, resid: torch.Tensor, rows: torch.Tensor) -> None:
        for span, scorer in zip(self.spans, self.scorers, strict=True):
            if scorer is not None:
                scorer.add(resid[:, span.start : span.stop], rows)

    def result(self, bootstrap: int) -> BandProbeResult:
        """R² per band with its 95% bootstrap interval over held-out sequences; a band is above
        its floor when its one-sided lower bound at LEVEL / (bands) exceeds 0."""
        K = sum(s is not None for s in self.scorers)
        n = len(next(s for s in self.scorers if s is not None).sse)
        weights = bootstrap_weights(n, max(bootstrap, math.ceil(20 * K / LEVEL)), seed=11)
        q = torch.tensor([0.025, 0.975, LEVEL / K], dtype=torch.float64)
        found, above = [], []
        for scorer in self.scorers:
            if scorer is None:
                found.append((None, None, None))
                above.append(False)
                continue
            score = scorer.result()
            lo, hi, bound = torch.quantile(probes.r2_replicates(score, weights), q).tolist()
            found.append((score.r2, lo, hi))
            above.append(bound > 0)
        return BandProbeResult(found, frontier(above))


class Bands(Stage):
    def work(self, analysis: Bench) -> int:
        return analysis.opts.seqs * analysis.T if contrast_window(analysis) else 0

    def run(self, analysis: Bench, ctx: Context) -> None:
        w = contrast_window(analysis)
        if w is None:
            return
        cuts = bands(analysis.T, w)
        for l, sums in enumerate(ctx.base.sums):
            self.record_content(analysis, l, sums, w, cuts)
        if probe_memory(analysis, len(cuts)) > PROBE_MEMORY:
            print(f"[bands] band probes skipped: their moments would take more than "
                  f"{PROBE_MEMORY >> 30} GiB (d_model {analysis.model.cfg.d_model})")  # fmt: skip
            return
        self.record_probes(analysis, ctx.tokens, w, cuts)

    def record_content(self, analysis, layer: int, sums, w: int, cuts: list[range]) -> None:
        add, n = analysis.rec.add, analysis.opts.seqs
        early = min(analysis.opts.early_queries, analysis.T)
        found = band_content(sums, w, analysis.boot_a, analysis.boot_b, early)
        for k in range(len(cuts)):
            cond = {"w": w, "band": k}
            add("band_c_res_content", found.value[k], layer=layer, condition=cond,
                std=found.se[k], lo=found.lo[k], hi=found.hi[k], n=n)  # fmt: skip
            add("band_c_res_content_floor", found.floor[k], layer=layer, condition=cond, n=n)
        add("band_frontier_content", found.frontier, layer=layer, condition={"w": w}, n=n)
        if layer >= 1:
            add("band_c_res_content_beyond", found.beyond, layer=layer, condition={"w": w},
                std=found.beyond_se, n=n)  # fmt: skip

    def record_probes(self, analysis, tokens, w: int, cuts: list[range]) -> None:
        """Fit each site's band probes on half A, score them on half B (one pass each)."""
        a, b = analysis.halves(len(tokens))
        d, folds = analysis.model.cfg.d_model, analysis.opts.probe_folds
        start = analysis.opts.probe_min_pos
        sites = [BandProbes(d, cuts, start, folds) for _ in analysis.resid_names]
        for half, method in ((a, "fit_rows"), (b, "score_rows")):
            consumers = {name: getattr(site, method) for name, site in
                         zip(analysis.resid_names, sites, strict=True)}  # fmt: skip
            stream(analysis.model, tokens[half], consumers, analysis.batch)
            if method == "fit_rows":
                for site in sites:
                    site.fit(len(b))
        for layer, site in enumerate(sites):
            found = site.result(analysis.opts.bootstrap)
            for k, (r2, lo, hi) in enumerate(found.bands):
                if r2 is not None:
                    analysis.rec.add("band_probe_r2", r2, layer=layer, lo=lo, hi=hi,
                                     condition={"w": w, "band": k}, n=len(b))  # fmt: skip
            analysis.rec.add("band_frontier", found.frontier, layer=layer, condition={"w": w},
                             n=len(b))  # fmt: skip

    def figures(self, groups, out, opts) -> dict:
        if not any(r["metric"] == "band_frontier" for runs in groups.values() for rows in runs
                   for r in rows):  # fmt: skip
            return {}
        return {"bands": plots.band_maps(out / "light_cone", groups, cone_band)}

    def sections(self, opts) -> list:
        return [Section("Light cone: position by query band and layer", ("bands",))]


def probe_memory(analysis, n_bands: int) -> int:
    """Bytes the band probes' moments take (float64 d x d per fold, band and site)."""
    d = analysis.model.cfg.d_model
    return 8 * d * d * analysis.opts.probe_folds * n_bands * len(analysis.resid_names)


def frontier_slope(metric: str):
    """A Reported's compute: the slope over layers of a per-layer frontier (bands per layer);
    the stream's frontier over sites >= 1 (site 0, the embeddings, is before any attention)."""

    def compute(rows, layers, opts, condition):
        first = 1 if metric == "band_frontier" else 0
        curve = {r["layer"]: r["value"] for r in rows
                 if r["metric"] == metric and r["layer"] >= first}  # fmt: skip
        return slope(curve)

    return compute


def probe_beyond(site: str):
    """A Reported's compute: the band probe's R² averaged over the bands beyond the first
    (queries i >= w) at the embeddings (site "first": position the tokens themselves carry)
    or at the last residual site."""

    def compute(rows, layers, opts, condition):
        cells = [r for r in rows if r["metric"] == "band_probe_r2"]
        if not cells:
            return None
        layer = (min if site == "first" else max)(r["layer"] for r in cells)
        beyond = [r["value"] for r in cells if r["layer"] == layer and r["condition"]["band"] >= 1]
        return sum(beyond) / len(beyond) if beyond else None

    return compute


STAGE = Bands(
    name="bands",
    order=26,
    metrics={
        "band_c_res_content": ATTN,
        "band_c_res_content_floor": ATTN,
        "band_frontier_content": ATTN,
        "band_c_res_content_beyond": ATTN,
        "band_probe_r2": RESID,
        "band_frontier": RESID,
    },
    numbers=(
        Reported(
            "band_frontier_slope",
            "band probe frontier: slope over residual sites ≥ 1",
            unit="bands per layer",
            compute=frontier_slope("band_frontier"),
        ),
        Reported(
            "band_frontier_content_slope",
            "C_content_res frontier: slope over attention layers",
            unit="bands per layer",
            compute=frontier_slope("band_frontier_content"),
        ),
        Reported(
            "band_frontier_last",
            "band probe frontier at the last residual site",
            unit="band",
            fmt=".0f",
            metric="band_frontier",
            reduce="last",
            parameters=("w",),
        ),
        Reported(
            "band_probe_r2_beyond_last",
            "band probe R² at queries i ≥ w (mean over those bands), last residual site",
            unit="R²",
            compute=probe_beyond("last"),
        ),
        Reported(
            "band_probe_r2_beyond_embed",
            "band probe R² at queries i ≥ w (mean over those bands), embeddings",
            unit="R²",
            compute=probe_beyond("first"),
        ),
        Reported(
            "band_c_res_content_beyond",
            "signed C_content_res² at queries i ≥ w on the window's pairs, mean over layers ≥ 1",
            reduce="mean_from_1",
            parameters=("w",),
        ),
    ),
)
