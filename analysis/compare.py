"""`posleak compare RUN_OR_SWEEP_DIR... [--out DIR]`

Groups runs by variant (from their sweep labels or configs), analyses any run that has not
been analysed yet, and writes a self-contained Markdown report with figures that puts the
variants side by side. Every number carries its seed-to-seed spread; a difference from the
reference variant that is within the spread is marked "≈" (not a finding).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from analysis import plots
from analysis.analyze import Options, analyze
from analysis.records import mean_std, read


def find_runs(paths: list[str]) -> list[Path]:
    runs = []
    for p in map(Path, paths):
        if (p / "config.toml").exists():
            runs.append(p)
        else:
            found = sorted(c.parent for c in p.glob("*/config.toml"))
            if not found:
                raise FileNotFoundError(f"{p} is neither a run directory nor holds any runs")
            runs += found
    return runs


def load_groups(runs: list[Path], opts: Options) -> tuple[dict, dict]:
    """{variant: [records of each run]} and {variant: [analysis summaries]}."""
    groups: dict = {}
    summaries: dict = {}
    for run in runs:
        records = run / "analysis" / "records.jsonl"
        if not records.exists():
            if not (run / "summary.json").exists():
                print(f"[compare] skipping {run}: training has not finished", file=sys.stderr)
                continue
            print(f"[compare] analysing {run}", file=sys.stderr)
            analyze(run, opts)
        summary = json.loads((run / "analysis" / "summary.json").read_text())
        groups.setdefault(summary["variant"], []).append(read(records))
        summaries.setdefault(summary["variant"], []).append(summary)
    return groups, summaries


HEADLINES = (
    ("val_loss", "validation loss", None),
    ("probe_r2", "probe R² (last layer)", "last"),
    ("probe_r2_mid", "probe R² (mean over layers ≥ 1)", None),
    ("c_res", "C_res (mean over layers, queries)", None),
    ("delta_r2", "ΔR² (mean over layers, heads)", None),
    ("sink_rate", "sink rate (mean over layers)", None),
    ("fingerprint_nobos", "x₀ dispersion without BOS (last layer)", None),
    ("bos_swap_k16", "C_res removed by BOS→mean, i<16", None),
    ("shift_js", "shift-test JS distance (mean over layers)", None),
)


def headline(summary: dict, key: str) -> float | None:
    """One number per run for the headline table (None where it was not measured)."""
    layers = summary["per_layer"]

    def values(metric, skip_embedding=False):
        per_layer = layers.get(metric, {})
        return [
            v for k, v in per_layer.items() if v is not None and not (skip_embedding and k == "0")
        ]

    def mean_of(metric, skip_embedding=False):
        vals = values(metric, skip_embedding)
        return sum(vals) / len(vals) if vals else None

    def last_of(metric):
        vals = values(metric)
        return vals[-1] if vals else None

    if key == "val_loss":
        return summary.get("val_loss")
    if key == "probe_r2":
        return last_of("probe_r2")
    if key == "probe_r2_mid":
        return mean_of("probe_r2", skip_embedding=True)
    if key == "fingerprint_nobos":
        return last_of("fingerprint_dispersion_nobos")
    if key == "bos_swap_k16":
        return mean_of("bos_swap_removed_mean_k16")
    return mean_of(key)


def headline_table(summaries: dict) -> list[str]:
    variants = list(summaries)
    ref = "rope" if "rope" in summaries else variants[0]
    lines = [
        f"Mean ± std over seeds (n per variant in the header). ≈ marks a difference from "
        f"`{ref}` no larger than the two seed spreads combined (std_a + std_b): not a finding. "
        "† marks a comparison with a single seed on one side: its spread is unknown.",
        "",
        "| metric | " + " | ".join(f"{v} (n={len(summaries[v])})" for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for key, label, _ in HEADLINES:
        stats = {}
        for v in variants:
            vals = [x for x in (headline(s, key) for s in summaries[v]) if x is not None]
            stats[v] = mean_std(vals) if vals else None
        cells = []
        for v in variants:
            if stats[v] is None:
                cells.append("–")
                continue
            m, s, n = stats[v]
            mark = ""
            if v != ref and stats[ref] is not None:
                rm, rs, rn = stats[ref]
                if min(n, rn) < 2:
                    mark = " †"
                elif abs(m - rm) <= s + rs:
                    mark = " ≈"
            cells.append(f"{m:.4g} ± {s:.2g}{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def figure(path: Path, draw, size=(7, 4.5)) -> str:
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    draw(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def per_layer_queries(path: Path, groups: dict, metric: str) -> str:
    n_layer = (
        max(
            (r["layer"] for rows in groups.values() for r in rows[0] if r["metric"] == metric),
            default=0,
        )
        + 1
    )
    fig, axes = plt.subplots(
        1, n_layer, figsize=(4 * n_layer, 3.5), constrained_layout=True, squeeze=False
    )
    for layer, ax in enumerate(axes[0]):
        plots.line_with_spread(ax, groups, metric, "query", head=None, layer=layer, condition=None)
        ax.set(title=f"{metric}, layer {layer}", xlabel="query position i")
    axes[0, 0].legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def write_report(groups: dict, summaries: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    fig = {}
    fig["probe"] = figure(out / "probe.png", lambda ax: plots.probe_curve(ax, groups))
    fig["c_mask_q"] = per_layer_queries(out / "c_mask_query.png", groups, "c_mask")
    fig["c_res_q"] = per_layer_queries(out / "c_res_query.png", groups, "c_res")
    fig["c_mask_l"] = figure(
        out / "c_mask_layer.png",
        lambda ax: plots.layer_curve(ax, groups, "c_mask", "C_mask vs layer (mean over queries)"),
    )
    fig["c_res_l"] = figure(
        out / "c_res_layer.png",
        lambda ax: plots.layer_curve(ax, groups, "c_res", "C_res vs layer (mean over queries)"),
    )
    fig["dr2"] = figure(
        out / "delta_r2.png",
        lambda ax: plots.layer_curve(
            ax, groups, "delta_r2", "ΔR² vs layer (mean over heads)", query=None
        ),
    )
    fig["fp"] = figure(out / "fingerprint.png", lambda ax: plots.fingerprint_curve(ax, groups))
    fig["swap"] = figure(
        out / "bos_swap.png", lambda ax: plots.swap_bars(ax, groups), size=(8, 4.5)
    )
    fig["shift"] = figure(
        out / "shift.png",
        lambda ax: plots.layer_curve(
            ax, groups, "shift_js", "Shift test: JS distance vs layer", query=None
        ),
    )
    n = len(groups)
    sink_fig, axes = plt.subplots(
        1, n, figsize=(3.5 * n + 1, 3.5), constrained_layout=True, squeeze=False
    )
    plots.sink_maps(sink_fig, list(axes[0]), groups)
    sink_fig.savefig(out / "sinks.png", dpi=100)
    plt.close(sink_fig)

    first = next(iter(summaries.values()))[0]
    lines = [
        "# Where does absolute position come from? Variant comparison",
        "",
        f"Runs: {sum(len(v) for v in summaries.values())} in {n} variants. Analysed on "
        f"{first['seqs']} held-out sequences of {first['seq_len']} tokens from `{first['data']}`. "
        "Definitions: posleak README, section *Metrics* (after ../shared/science.md).",
        "",
        "## Headline numbers",
        "",
        *headline_table(summaries),
        "",
        "## Position probe (held-out R² of a ridge probe x_i → i)",
        f"![probe]({fig['probe']})",
        "",
        "## Causal-mask component C_mask(i) = log Σ_j exp ĝ(i−j)",
        f"![C_mask vs query]({fig['c_mask_q']})",
        f"![C_mask vs layer]({fig['c_mask_l']})",
        "",
        "## Residual-stream component C_res(i) = mean_j |s_ij − ĝ(i−j)|",
        f"![C_res vs query]({fig['c_res_q']})",
        f"![C_res vs layer]({fig['c_res_l']})",
        "",
        "## Logit leakage ΔR² (absolute terms beyond i−j, held out)",
        f"![delta R2]({fig['dr2']})",
        "",
        "## Sinks: α₀ = mean_i A_i0 per layer and head",
        "![sinks](sinks.png)",
        "",
        "## Position-0 fingerprint (with BOS it must be exactly 0)",
        f"![fingerprint]({fig['fp']})",
        "",
        "## BOS replacement: share of C_res removed at early queries",
        f"![bos swap]({fig['swap']})",
        "",
        "## Shift test (same content at two offsets)",
        f"![shift]({fig['shift']})",
        "",
        "## Runs",
        "",
        "| variant | seed | run | step | val loss |",
        "|---|---|---|---|---|",
    ]
    for variant, items in summaries.items():
        for s in items:
            loss = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "–"
            lines.append(f"| {variant} | {s['seed']} | `{s['run']}` | {s['step']} | {loss} |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "headline.json").write_text(
        json.dumps(
            {
                v: {k: [headline(s, k) for s in items] for k, _, _ in HEADLINES}
                for v, items in summaries.items()
            },
            indent=2,
        )
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="run directories or sweep directories")
    parser.add_argument("--out", default="runs/compare", help="report directory")
    parser.add_argument(
        "--seqs", type=int, default=Options.seqs, help="sequences for runs not yet analysed"
    )


def run(args: argparse.Namespace) -> int:
    try:
        runs = find_runs(args.paths)
        groups, summaries = load_groups(runs, Options(seqs=args.seqs))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not groups:
        print("error: no finished runs to compare", file=sys.stderr)
        return 2
    report = write_report(groups, summaries, Path(args.out))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    from posleak.cli import standalone

    sys.exit(standalone(__doc__, "python -m analysis.compare", add_arguments, run))
