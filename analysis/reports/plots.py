"""Figures as pure functions of records. `groups` maps a variant to the record lists of its
runs (one per seed); a curve is the mean over runs with the 95% t-interval of that mean (the
interval the tables and verdicts use; for a single run, its bootstrap interval over
sequences), and every title says which."""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator, PercentFormatter

from posleak.analysis.engine.records import across_runs, mean_std, removed_over_layers, select
from posleak.analysis.maths.seeds import t_quantile_975
from posleak.files import atomic_write

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
FORMATS = ("png", "svg")
LEGEND = 9  # legend font size (points)
DPI = 150


def line_with_spread(ax, groups, metric, x, label_suffix="", style="-", **where) -> None:
    """The mean over a variant's runs, with a band: the 95% t-interval of the mean over seeds
    when it has several, else the run's own 95% bootstrap interval over sequences where the
    records hold one."""
    for idx, (variant, runs) in enumerate(groups.items()):
        stats = across_runs(runs, metric, x, **where)
        if not stats:
            continue
        xs = np.array(list(stats))
        mean = np.array([v[0] for v in stats.values()])
        color = COLORS[idx % len(COLORS)]
        ax.plot(xs, mean, style, color=color, label=f"{variant}{label_suffix} (n={len(runs)})")
        if len(runs) > 1:
            half = np.array([t_half(v[1], v[2]) for v in stats.values()])
            ax.fill_between(xs, mean - half, mean + half, color=color, alpha=0.2, linewidth=0)
        elif (band := _interval(runs[0], metric, x, where)) is not None:
            ax.fill_between(band[0], band[1], band[2], color=color, alpha=0.2, linewidth=0)


def _interval(rows, metric, x, where) -> tuple | None:
    """(x, lo, hi) of one run's curve, when every point has its bootstrap interval."""
    points = sorted(
        (r[x], r["lo"], r["hi"]) for r in select(rows, metric, **where) if r[x] is not None
    )
    if not points or any(lo is None or hi is None for _, lo, hi in points):
        return None
    return tuple(np.array(column, dtype=float) for column in zip(*points, strict=True))


def t_half(sd: float, n: int) -> float:
    """Half the width of the 95% t-interval of a mean of n values with this sd (0 for one)."""
    return t_quantile_975(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0


def spread(groups) -> str:
    """What a figure's bands show, for its title."""
    if any(len(runs) > 1 for runs in groups.values()):
        return "mean over seeds; band: 95% t-interval of the mean"
    return "one run; band: 95% bootstrap over sequences"


def _layer_axis(ax, xlabel):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)


def probe_curve(ax, groups) -> None:
    line_with_spread(ax, groups, "probe_r2_log", "layer", head=None, query=None, condition=None)
    ax.set(
        ylabel="held-out R² (probe_r2_log)",
        title=f"Position probe, target log(1+i)\n{spread(groups)}",
    )
    _layer_axis(ax, "residual site (0 = embedding)")
    ax.axhline(0, color="grey", lw=0.5)


def layer_curve(ax, groups, metric, ylabel, title, **where) -> None:
    line_with_spread(ax, groups, metric, "layer", head=None, **where)
    ax.set(ylabel=f"{ylabel} ({metric})", title=f"{title}\n{spread(groups)}")
    _layer_axis(ax, "attention layer")


def per_layer_queries(path: Path, groups: dict, metric: str, ylabel: str, log_x=False) -> str:
    """One panel per layer of metric vs query position (pooled over heads), shared y-scale."""
    n_layer = 1 + max(
        (r["layer"] for runs in groups.values() for r in runs[0] if r["metric"] == metric),
        default=0,
    )
    fig, axes = plt.subplots(
        1,
        n_layer,
        figsize=(3.6 * n_layer, 3.4),
        constrained_layout=True,
        squeeze=False,
        sharey=True,
    )
    for layer, ax in enumerate(axes[0]):
        line_with_spread(ax, groups, metric, "query", head=None, layer=layer, condition=None)
        ax.set(title=f"layer {layer}", xlabel="query position i")
        if log_x:
            ax.set_xscale("symlog", linthresh=1)
        log_if_decades(ax)
    axes[0, 0].set_ylabel(f"{ylabel} ({metric})")
    axes[0, 0].legend(fontsize=LEGEND)
    fig.suptitle(f"{ylabel} vs query, pooled over heads; {spread(groups)}", fontsize=11)
    return save(fig, path)


def head_maps(
    path: Path, groups: dict, metric: str, label: str, ratio=False, baseline: str | None = None
) -> str:
    """Layer x head heat maps of a per-head metric, mean over seeds, at most four panels a row
    and one colour bar. `ratio` and `baseline` draw on a diverging map centred where a head
    is neutral. `ratio`: a ratio to a uniform baseline of 1 (λ₀), drawn as log10 centred at
    0. `baseline`: a per-layer metric each cell is drawn against (α₀ minus its layer's
    uniform share, which falls with the window and differs between a hybrid model's layers)."""
    grids = {}
    for variant, runs in groups.items():
        cells: dict = {}
        for rows in runs:
            base = {r["layer"]: r["value"] for r in select(rows, baseline)} if baseline else {}
            for r in select(rows, metric, query=None, condition=None):
                if r["head"] is not None and r["value"] is not None:
                    value = r["value"] - base.get(r["layer"], 0.0)
                    cells.setdefault((r["layer"], r["head"]), []).append(value)
        if cells:
            shape = (max(k[0] for k in cells) + 1, max(k[1] for k in cells) + 1)
            grid = np.full(shape, np.nan)
            for key, vals in cells.items():
                grid[key] = sum(vals) / len(vals)
            grids[variant] = grid
    if ratio:
        grids = {v: np.log10(np.clip(g, 1e-6, None)) for v, g in grids.items()}
    n = max(len(grids), 1)
    cols = min(n, 4)
    fig, axes = plt.subplots(
        math.ceil(n / cols), cols, figsize=(3 * cols + 1.2, 3.2 * math.ceil(n / cols)),
        constrained_layout=True, squeeze=False,
    )  # fmt: skip
    values = np.concatenate([g.ravel() for g in grids.values()]) if grids else np.zeros(1)
    lo, hi, cmap = np.nanmin(values), max(np.nanmax(values), np.nanmin(values) + 1e-9), "viridis"
    if ratio or baseline:  # symmetric about the neutral 0
        hi = max(abs(np.nanmin(values)), abs(np.nanmax(values)), 1e-9)
        lo, cmap = -hi, "RdBu_r"
    image = None
    for ax, (variant, grid) in zip(axes.flat, grids.items(), strict=False):
        image = ax.imshow(grid, vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
        ax.set(xlabel="head", ylabel="attention layer", title=variant)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
    for ax in list(axes.flat)[len(grids) :]:
        ax.axis("off")
    if image is not None:
        scale = f"log10 {label} (0 = uniform)" if ratio else label
        scale = f"{label} − its layer's uniform share" if baseline else scale
        fig.colorbar(image, ax=list(axes.flat), shrink=0.85, label=f"{scale} ({metric})")
    fig.suptitle(f"{label}, mean over seeds", fontsize=10)
    return save(fig, path)


def fingerprint_curve(ax, groups) -> None:
    line_with_spread(
        ax, groups, "fingerprint_dispersion", "layer", " BOS", "-", condition={"bos": "always"}
    )
    line_with_spread(
        ax, groups, "fingerprint_dispersion", "layer", " no BOS", "--", condition={"bos": "never"}
    )
    ax.set(
        ylabel="std/‖mean‖ of x₀ (fingerprint_dispersion)",
        title=f"Position-0 state across inputs (batch size 1)\n{spread(groups)}",
    )
    _layer_axis(ax, "residual site (0 = embedding)")


def swap_bars(path: Path, groups, ks: tuple, kinds: tuple) -> str:
    """Removed share of C_res² at queries 1 <= i < k (None: all), pooled over layers, per
    replacement kind."""
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(4 * len(kinds), 3.4), constrained_layout=True, squeeze=False
    )
    axes = axes[0]
    width = 0.8 / max(len(groups), 1)
    for ax, kind in zip(axes, kinds, strict=True):
        for idx, (variant, runs) in enumerate(groups.items()):
            stats = []
            for k in ks:
                vals = [v for v in (removed_over_layers(r, kind, k) for r in runs) if v is not None]
                m = mean_std(vals) if vals else None
                stats.append((m[0], t_half(m[1], m[2])) if m else (np.nan, 0.0))
            xs = np.arange(len(ks)) + idx * width
            ax.bar(
                xs,
                [s[0] for s in stats],
                width,
                yerr=[s[1] for s in stats],
                color=COLORS[idx % len(COLORS)],
                label=variant,
            )
        ax.set_xticks(np.arange(len(ks)) + width * (len(groups) - 1) / 2)
        ax.set_xticklabels([f"i<{k}" if k else "all" for k in ks])
        ax.set(title=f"BOS → {kind}")
        ax.axhline(0, color="grey", lw=0.5)
    for ax in axes:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].set_ylabel("share removed, 1 − ΣC²_swap / ΣC² (bos_swap_removed)")
    axes[0].legend(fontsize=LEGEND)
    fig.suptitle(
        "BOS replacement: share of the residual component removed, pooled over layers; "
        "mean over seeds, bars: 95% t-interval of the mean (each panel its own scale)",
        fontsize=10,
    )
    return save(fig, path)


def knockout_curve(ax, groups) -> None:
    line_with_spread(
        ax, groups, "probe_r2_log", "layer", " intact", "-", head=None, query=None, condition=None
    )
    line_with_spread(
        ax,
        groups,
        "knockout_probe_r2_log",
        "layer",
        " key 0 knocked out",
        "--",
        condition={"layer": "all"},
    )
    ax.set(
        ylabel="R² of the intact model's probe (transfer; probe_r2_log)",
        title=f"Key-0 knockout in every layer, the intact model's probe\n{spread(groups)}",
    )
    _layer_axis(ax, "residual site (0 = embedding)")


def extrapolation_curve(ax, groups) -> None:
    conds = {
        json.dumps(r["condition"], sort_keys=True): r["condition"]
        for runs in groups.values()
        for rows in runs
        for r in select(rows, "loss_mean")
    }
    lengths = sorted({c["len"] for c in conds.values()})
    longest = [c for c in conds.values() if lengths and c["len"] == lengths[-1]]
    for cond in sorted(longest, key=lambda c: c["ntk"] != "none"):
        style = "--" if cond["ntk"] != "none" else "-"
        label = f" len={cond['len']}" + ("" if cond["ntk"] == "none" else ", NTK")
        line_with_spread(ax, groups, "loss_by_position", "query", label, style, condition=cond)
    if len(lengths) > 1:  # the shortest analysed length is the training length
        ax.axvline(lengths[0], color="grey", lw=0.8, ls=":", label=f"T_train = {lengths[0]}")
    ax.set(
        xlabel="position",
        ylabel="next-token loss (nats; loss_by_position)",
        title=f"Loss per position beyond the training length\n{spread(groups)}",
    )
    ax.set_xscale("symlog", linthresh=16)
    ax.set_xlim(left=0)  # positions start at 0: no blank negative decades


def log_if_decades(ax, decades: float = 2.0) -> None:
    """A log y-axis when every plotted value is positive and they span `decades` or more."""
    ys = np.concatenate(
        [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [[]]
    )
    ys = ys[np.isfinite(ys)]
    if len(ys) and ys.min() > 0 and np.log10(ys.max() / ys.min()) >= decades:
        ax.set_yscale("log")


def seed_curves(path: Path, series: dict, xlabel: str, ylabel: str, title: str) -> str:
    """One line per name: the mean over seeds of {x: y} curves, with the 95% t-interval of the
    mean as a band."""

    def draw(ax):
        for color, (name, curves) in zip(COLORS * 4, series.items(), strict=False):
            keys = sorted({x for c in curves for x in c}, key=float)
            points = [(float(x), v) for x in keys if (v := [c[x] for c in curves if x in c])]
            xs = [x for x, _ in points]
            mean = np.array([mean_std(v)[0] for _, v in points])
            half = np.array([t_half(*mean_std(v)[1:]) for _, v in points])
            ax.plot(xs, mean, "o-", ms=3, color=color, label=f"{name} (n={len(curves)})")
            ax.fill_between(xs, mean - half, mean + half, color=color, alpha=0.15)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)

    return figure(path, draw)


def figure(path: Path, draw, size=(6.5, 4.2)) -> str:
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    draw(ax)
    log_if_decades(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=LEGEND)
    return save(fig, path)


def save(fig, path: Path) -> str:
    """PNG for the reports and SVG for papers; returns the PNG's file name."""
    for fmt in FORMATS:
        write_figure(fig, Path(path).with_suffix(f".{fmt}"), dpi=DPI)
    plt.close(fig)
    return Path(path).with_suffix(".png").name


def write_figure(fig, path: Path, dpi: int) -> None:
    """fig rendered in memory, then written atomically (never through a link)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix[1:], dpi=dpi)
    atomic_write(path, buffer.getvalue())


def run_figures(groups: dict, out: Path, title: str) -> Path:
    """One overview figure (report.png) of one run's measurements."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    probe_curve(axes[0, 0], groups)
    c_res_by_layer(axes[0, 1], groups)
    layer_curve(
        axes[0, 2],
        groups,
        "abs_share",
        "absolute share",
        "abs_share per layer",
        query=None,
        condition=None,
    )
    fingerprint_curve(axes[1, 0], groups)
    knockout_curve(axes[1, 1], groups)
    extrapolation_curve(axes[1, 2], groups)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=LEGEND)
    fig.suptitle(title)
    path = Path(out) / "report.png"
    write_figure(fig, path, dpi=DPI)
    plt.close(fig)
    return path


def c_res_by_layer(ax, groups) -> None:
    """C_res vs query, one line per attention layer, of the first variant's runs."""
    variant, runs = next(iter(groups.items()))
    layers = sorted({r["layer"] for r in select(runs[0], "c_res") if r["layer"] is not None})
    for layer in layers:
        stats = across_runs(runs, "c_res", "query", head=None, layer=layer, condition=None)
        ax.plot(list(stats), [v[0] for v in stats.values()], label=f"layer {layer}")
    ax.set(
        title=f"C_res vs query, pooled heads, per layer ({variant})",
        xlabel="query position i",
        ylabel="residual component (c_res)",
    )


def band_maps(path: Path, groups: dict, edge) -> str:
    """Per variant, band x layer maps of the light cone (analysis/stages/bands.py): the band
    probe's held-out R² by residual site (top) and the share of runs whose band C_content_res
    exceeds its family-wise floor by attention layer (bottom), with the window's cone drawn as
    a line (edge(layer, w, site): the last band it reaches; a reference under full
    attention)."""
    variants = list(groups)
    ncols = min(len(variants), 5)
    blocks = math.ceil(len(variants) / ncols)
    fig, axes = plt.subplots(2 * blocks, ncols, figsize=(2.6 * ncols + 1.2, 4.4 * blocks),
                             constrained_layout=True, squeeze=False)  # fmt: skip
    images = [None, None]
    for idx, variant in enumerate(variants):
        runs = groups[variant]
        for row, (metric, site, label) in enumerate(BAND_PANELS):
            ax = axes[2 * (idx // ncols) + row, idx % ncols]
            grid, w = _band_grid(runs, metric)
            if grid is None:
                ax.set_axis_off()
                continue
            images[row] = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower",
                                    aspect="auto", interpolation="nearest")  # fmt: skip
            layers = np.arange(grid.shape[0])
            reach = [edge(int(l), w, site) + 0.5 for l in layers]
            ax.step(reach, layers, where="mid", color="white", linestyle="--", linewidth=1.2)
            ax.set(title=f"{variant} (n={len(runs)})", xlabel=f"query band (width {w})",
                   ylabel=label)  # fmt: skip
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(variants) * 2 :]:
        ax.set_axis_off()
    for image, label, side in zip(images, BAND_COLOURS, ("right", "bottom"), strict=True):
        if image is not None:  # one bar to the right, one below: they cannot overlap
            fig.colorbar(image, ax=list(axes.flat), location=side, shrink=0.6, label=label)
    fig.suptitle("Light cone: position by query band (dashed: the window's cone edge); "
                 "mean over seeds", fontsize=10)  # fmt: skip
    return save(fig, path)


BAND_PANELS = (
    ("band_probe_r2", "resid", "residual site"),
    ("band_above", "attn", "attention layer"),
)
BAND_COLOURS = ("band probe R² (held out)", "C_content_res above floor (share of runs)")


def _band_grid(runs: list, metric: str) -> tuple:
    """(layers x bands) grid, mean over runs, and the band width; (None, None) without rows.
    metric "band_above": 1 where band_c_res_content exceeds band_c_res_content_floor."""
    cells: dict = {}
    w = None
    for rows in runs:
        floors = {(r["layer"], r["condition"]["band"]): r["value"]
                  for r in rows if r["metric"] == "band_c_res_content_floor"}  # fmt: skip
        source = "band_c_res_content" if metric == "band_above" else metric
        for r in rows:
            if r["metric"] != source or r["value"] is None:
                continue
            key = (r["layer"], r["condition"]["band"])
            w = r["condition"]["w"]
            value = float(r["value"] > floors[key]) if metric == "band_above" else r["value"]
            cells.setdefault(key, []).append(value)
    if not cells:
        return None, None
    grid = np.full((max(k[0] for k in cells) + 1, max(k[1] for k in cells) + 1), np.nan)
    for key, values in cells.items():
        grid[key] = sum(values) / len(values)
    return grid, w


def forest(path: Path, rows: list[tuple], xlabel: str, title: str) -> str:
    """A verdict figure: one line per contrast of a family, its paired mean difference and 95%
    t-interval; a finding (Holm) drawn solid and named, a null hollow with its minimum
    detectable effect at the deciding level shaded around 0. rows: (label, mean, lo, hi,
    finding, mde or None), as Verdicts.forest_rows() gives them."""
    height = 1.6 + 0.42 * len(rows)
    title = textwrap.fill(title, 80)

    def draw(ax):
        for y, (_, mean, lo, hi, finding, mde) in enumerate(reversed(rows)):
            if mde is not None:
                ax.fill_betweenx([y - 0.3, y + 0.3], -mde, mde, color="0.85", lw=0)
            color = COLORS[0] if finding else "0.35"
            ax.plot([lo, hi], [y, y], color=color, lw=2)
            ax.plot(mean, y, "o", ms=7, color=color, mfc=color if finding else "white")
        ax.axvline(0, color="black", lw=0.8)
        names = [
            textwrap.fill(row[0].replace("`", "") + (" — finding" if row[4] else ""), 48)
            for row in rows
        ]
        ax.set_yticks(range(len(rows)), names[::-1])
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_xlabel(xlabel)
        key = "95% t-intervals over seeds; filled: a finding (Holm); grey: ± the MDE of a null"
        ax.figure.suptitle(f"{title}\n{key}", fontsize=10)

    return figure(path, draw, size=(8.0, height))


def attention_maps(path: Path, groups: dict) -> str:
    """The recorded mean attention A_ij at the early queries of each variant's top heads by
    λ₀ (one seed: its first analysis): a row of heads per variant, one colour scale, 0 to
    the largest weight."""
    panels = []
    for variant, runs in groups.items():
        rows = select(runs[0], "attention_early") if runs else []
        for l, h in sorted({(r["layer"], r["head"]) for r in rows}):
            mine = [r for r in rows if r["layer"] == l and r["head"] == h]
            k = max(r["query"] for r in mine) + 1
            grid = np.full((k, k), np.nan)
            for r in mine:
                grid[r["query"], r["condition"]["key"]] = r["value"]
            panels.append((f"{variant}: layer {l}, head {h}", grid))
    cols = min(3, max(len(panels), 1))
    nrows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.1 * cols + 1.0, 2.9 * nrows), constrained_layout=True, squeeze=False
    )
    top = max((np.nanmax(g) for _, g in panels), default=1.0)
    image = None
    for ax, (title, grid) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(grid, vmin=0, vmax=top, cmap="magma", origin="upper")
        ax.set(xlabel="key j", ylabel="query i", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="mean attention A_ij")
    fig.suptitle(
        "Early-query attention of the heads with the highest λ₀ (one seed each)", fontsize=10
    )
    return save(fig, path)
