"""analysis.json of one analysis, as a pure function of its records and options.

`per_layer` holds one number per layer for each curve a stage draws; `headline` one number
per run for the comparison table (the units that are paired by seed across variants). Both
loop over the registered stages (analysis/stages/).
"""

from __future__ import annotations

import dataclasses
import sys

from posleak import version
from posleak.analysis.measures import DEFINITIONS
from posleak.analysis.options import Options
from posleak.analysis.stages import STAGES


def per_layer(rows: list[dict], opts: Options) -> dict:
    """Every stage's per-layer curves."""
    out: dict = {}
    for stage in STAGES:
        out.update(stage.per_layer(rows, opts))
    return out


def headline(rows: list[dict], layers: dict, val_loss: float | None, opts: Options) -> dict:
    """One number per run for each comparison row (None where not measured)."""
    out = {"val_loss": val_loss}
    for stage in STAGES:
        out.update(stage.headline(rows, layers, opts))
    return out


def peak_rss_mb() -> float | None:
    """The process's resident-memory high-water mark so far (MB; None off Linux/macOS): for
    an analysis run by itself, what it needed, model loading included."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def summarise(analysis, seconds: float) -> dict:
    """analysis.json of an Analysis that has run."""
    rows = analysis.rec.rows
    subject = analysis.subject
    opts = analysis.opts
    layers = per_layer(rows, opts)
    model = analysis.model
    return {
        **analysis.label,
        "definitions": DEFINITIONS,
        "posleak": version(),
        **subject.info,
        "position": model.cfg.position,
        "window": model.cfg.window,
        "windows": list(analysis.windows),  # per layer (a hybrid has window and global layers)
        "rope_base": model.rope_effective_base,
        "rope_scale": analysis.opts.rope_scale,  # NTK applied at inference (None: none)
        "seqs": analysis.opts.seqs,
        "seq_len": analysis.T,
        "data": subject.data,
        "bos": analysis.bos,
        "seconds": round(seconds, 2),
        "peak_rss_mb": peak_rss_mb(),
        "timings": analysis.timings,
        "per_layer": layers,
        "headline": headline(rows, layers, subject.info.get("val_loss"), opts),
        "options": dataclasses.asdict(opts),  # what the labels of every report are made from
    }


def run_report(summary: dict, figure: str) -> str:
    early = Options.of_summary(summary).early_queries
    """report.md of one analysis: what was analysed, the per-layer numbers, the figure."""
    layers = summary["per_layer"]
    interval = layers["probe_r2_log_interval"]

    def cell(table: dict, layer, fmt="{:.3f}"):
        value = table.get(layer, table.get(str(layer)))
        return "–" if value is None else fmt.format(value)

    def probe(layer):
        lo, hi = interval.get(layer, interval.get(str(layer), [None, None]))
        r2 = cell(layers["probe_r2_log"], layer, "{:.2f}")
        return r2 if lo is None else f"{r2} [{lo:.2f}, {hi:.2f}]"

    loss = summary.get("val_loss")
    lines = [
        f"# Analysis of `{summary['run']}`",
        "",
        f"Variant `{summary['variant']}`, seed {summary['seed']}, step {summary.get('step')}; "
        f"{summary['seqs']} held-out sequences of {summary['seq_len']} tokens from "
        f"`{summary['data']}`, BOS {summary['bos']}; definitions version "
        f"{summary['definitions']}; validation loss {'–' if loss is None else f'{loss:.4f}'}.",
        "",
        f"| residual site | probe R², log target [95% bootstrap over {summary['seqs']} "
        "sequences] |",
        "|---|---|",
        *(f"| {layer} | {probe(layer)} |" for layer in layers["probe_r2_log"]),
        "",
        f"| attention layer | C_res RMS over queries 1–{early - 1} | abs_share | α₀ of the "
        "strongest head | sink rate |",
        "|---|---|---|---|---|",
        *(
            f"| {layer} | {cell(layers['c_res_early'], layer)} | "
            f"{cell(layers['abs_share'], layer)} | {cell(layers['alpha0_max'], layer)} | "
            f"{cell(layers['sink_rate'], layer, '{:.2f}')} |"
            for layer in layers["c_res_early"]
        ),
        "",
        f"![overview]({figure})",
        "",
    ]
    return "\n".join(lines)
