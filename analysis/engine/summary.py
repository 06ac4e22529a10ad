"""analysis.json of one analysis, and its report.md, as pure functions of its records and
options.

`per_layer` holds one number per layer for each curve a stage draws; `headline` every number
the stages declare (analysis/engine/numbers.py), under the keys their declarations compose:
the units that are paired by seed across variants. Both loop over the registered stages
(analysis/stages/), and so does the per-run report.
"""

from __future__ import annotations

import dataclasses
import sys

from posleak import version
from posleak.analysis.engine.options import Options
from posleak.analysis.engine.provenance import provenance
from posleak.analysis.maths.measures import DEFINITIONS
from posleak.analysis.stages import NUMBERS, STAGES, enabled


def per_layer(rows: list[dict], opts: Options) -> dict:
    """Every stage's per-layer curves."""
    out: dict = {}
    for stage in STAGES:
        out.update(stage.per_layer(rows, opts))
    return out


def headline(rows: list[dict], layers: dict, opts: Options) -> dict:
    """Every declared number of one analysis (None where not measured)."""
    return NUMBERS.headline(rows, layers, opts)


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
        "headline": headline(rows, layers, opts),
        "options": dataclasses.asdict(opts),  # what the labels of every report are made from
        "stages": enabled(opts),  # what ran: reuse needs the same
        "provenance": provenance(),  # commit, package versions, the command
    }


def run_report(summary: dict, figure: str) -> str:
    """report.md of one analysis: what was analysed, every declared number, then each
    stage's per-layer curves as one table per stage (a new stage appears without an edit
    here), and the overview figure."""
    opts = Options.of_summary(summary)
    loss = summary.get("val_loss")
    lines = [
        f"# Analysis of `{summary['run']}`",
        "",
        f"Variant `{summary['variant']}`, seed {summary['seed']}, step {summary.get('step')}; "
        f"{summary['seqs']} held-out sequences of {summary['seq_len']} tokens from "
        f"`{summary['data']}`, BOS {summary['bos']}; definitions version "
        f"{summary['definitions']}; validation loss {'–' if loss is None else f'{loss:.4f}'}.",
        "",
        f"![overview]({figure})",
        "",
        "## Numbers",
        "",
        "| number | value |",
        "|---|--:|",
    ]
    for number in NUMBERS:
        for condition in number.values_of(opts):
            value = summary["headline"].get(number.key(**condition))
            if value is not None:
                lines.append(f"| {number.title(opts, **condition)} | {number.format(value)} |")
    layers = summary["per_layer"]
    for stage in STAGES:
        curves = {
            name: layers[name]
            for name in stage.per_layer([], opts)
            if layers.get(name) and not name.endswith("_interval")
        }
        if not curves:
            continue
        index = sorted({l for curve in curves.values() for l in curve})
        lines += ["", f"## {stage.name}", "", "| layer | " + " | ".join(curves) + " |"]
        lines.append("|--:|" + "--:|" * len(curves))
        for l in index:
            cells = (_cell(curve.get(l)) for curve in curves.values())
            lines.append(f"| {l} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.3g}"
    return "–"
