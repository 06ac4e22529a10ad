"""Figures as pure functions of records. `groups` maps a variant to the record lists of its
runs (one per seed); every curve is the mean over runs with a band of +-1 std (seed spread)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from analysis.records import across_runs, mean_std, select

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def line_with_spread(ax, groups, metric, x, label_suffix="", style="-", **where) -> None:
    for idx, (variant, runs) in enumerate(groups.items()):
        stats = across_runs(runs, metric, x, **where)
        if not stats:
            continue
        xs = np.array(list(stats))
        mean = np.array([v[0] for v in stats.values()])
        std = np.array([v[1] for v in stats.values()])
        color = COLORS[idx % len(COLORS)]
        ax.plot(xs, mean, style, color=color, label=f"{variant}{label_suffix} (n={len(runs)})")
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def probe_curve(ax, groups) -> None:
    line_with_spread(ax, groups, "probe_r2", "layer", head=None, query=None)
    ax.set(xlabel="layer (0 = embedding)", ylabel="held-out R² (position)", title="Position probe")
    ax.axhline(0, color="grey", lw=0.5)


def query_curve(ax, groups, metric: str, title: str) -> None:
    line_with_spread(ax, groups, metric, "query", head=None, condition=None)
    ax.set(xlabel="query position i", ylabel=metric, title=f"{title} (mean over layers)")


def layer_curve(ax, groups, metric: str, title: str, **where) -> None:
    line_with_spread(ax, groups, metric, "layer", head=None, **where)
    ax.set(xlabel="layer", ylabel=metric, title=title)


def fingerprint_curve(ax, groups) -> None:
    line_with_spread(ax, groups, "fingerprint_dispersion", "layer", " BOS", "-", condition="bos")
    line_with_spread(
        ax, groups, "fingerprint_dispersion", "layer", " no BOS", "--", condition="nobos"
    )
    ax.set(xlabel="layer", ylabel="std / ‖mean‖ of x₀", title="Position-0 fingerprint dispersion")


def swap_bars(ax, groups, early_k=(8, 16, 32, 64, "all"), kind="mean") -> None:
    width = 0.8 / max(len(groups), 1)
    for idx, (variant, runs) in enumerate(groups.items()):
        means, stds = [], []
        for k in early_k:
            per_run = []
            for rows in runs:
                vals = [
                    r["value"]
                    for r in select(rows, "bos_swap_removed", condition=f"{kind},k={k}")
                    if r["value"] is not None
                ]
                if vals:
                    per_run.append(sum(vals) / len(vals))
            m, s, _ = mean_std(per_run) if per_run else (np.nan, 0.0, 0)
            means.append(m)
            stds.append(s)
        xs = np.arange(len(early_k)) + idx * width
        ax.bar(xs, means, width, yerr=stds, color=COLORS[idx % len(COLORS)], label=variant)
    ax.set_xticks(np.arange(len(early_k)) + width * (len(groups) - 1) / 2)
    ax.set_xticklabels([f"i<{k}" if k != "all" else "all" for k in early_k])
    ax.set(ylabel="1 − C_res^swap / C_res", title=f"BOS replaced by {kind} embedding")
    ax.axhline(0, color="grey", lw=0.5)


def sink_maps(fig, axes, groups) -> None:
    for ax, (variant, runs) in zip(axes, groups.items(), strict=False):
        cells: dict = {}
        for rows in runs:
            for r in select(rows, "sink_alpha0"):
                cells.setdefault((r["layer"], r["head"]), []).append(r["value"])
        if not cells:
            continue
        n_layer = max(k[0] for k in cells) + 1
        n_head = max(k[1] for k in cells) + 1
        grid = np.zeros((n_layer, n_head))
        for (layer, head), vals in cells.items():
            grid[layer, head] = sum(vals) / len(vals)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(xlabel="head", ylabel="layer", title=f"α₀ sink map: {variant}")
        ax.set_xticks(range(n_head))
        ax.set_yticks(range(n_layer))
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean A_i0 (i ≥ 1)")


def run_figures(groups: dict, out: Path, title: str) -> Path:
    """One overview figure (report.png) of the measurements of one or more runs."""
    fig, axes = plt.subplots(3, 3, figsize=(16, 13), constrained_layout=True)
    probe_curve(axes[0, 0], groups)
    query_curve(axes[0, 1], groups, "c_mask", "C_mask vs query")
    query_curve(axes[0, 2], groups, "c_res", "C_res vs query")
    layer_curve(axes[1, 0], groups, "c_res", "C_res vs layer (mean over queries)")
    layer_curve(axes[1, 1], groups, "delta_r2", "ΔR² (mean over heads)", query=None)
    fingerprint_curve(axes[1, 2], groups)
    swap_bars(axes[2, 0], groups)
    layer_curve(axes[2, 1], groups, "shift_js", "Shift test: JS distance", query=None)
    sink_maps(fig, [axes[2, 2]], {k: v for k, v in list(groups.items())[:1]})
    for ax in axes.flat[:-1]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    path = Path(out) / "report.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
