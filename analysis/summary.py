"""Headline numbers of one analysed run, as a pure function of its records.

`per_layer` holds one number per layer for each curve the report draws; `headline` one
number per run for the comparison table (the units that are paired by seed across variants).
"""

from __future__ import annotations

import math
from collections import defaultdict

from posleak import version
from posleak.analysis.measures import DEFINITIONS

EARLY = 16  # "early queries": 1 <= i < EARLY
KINDS = ("mean", "token", "random", "zeros")


def _by_layer(rows, metric, head=None, query=None, condition=None) -> dict:
    return {
        r["layer"]: r["value"]
        for r in rows
        if r["metric"] == metric
        and r["head"] == head
        and r["query"] == query
        and r["condition"] == condition
    }


def _per_layer_queries(rows, metric, condition=None, head=None) -> dict:
    """{layer: {query: value}} of a per-query metric."""
    out: dict = defaultdict(dict)
    for r in rows:
        if (
            r["metric"] == metric
            and r["head"] == head
            and r["condition"] == condition
            and r["query"] is not None
        ):
            out[r["layer"]][r["query"]] = r["value"]
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _early_square_sum(curve: dict, k: int | None) -> float:
    """sum over 1 <= i < k of C(i)^2 (C recorded as a root, clamped at 0)."""
    return sum((v or 0.0) ** 2 for i, v in curve.items() if i >= 1 and (k is None or i < k))


def removed_over_layers(rows, kind: str, k: int | None) -> float | None:
    """1 - sum_{layers, 1<=i<k} C_swap^2 / sum C^2: the BOS replacement's removed share pooled
    over layers (per-layer ratios explode where a layer has almost no signal)."""
    base = _per_layer_queries(rows, "c_res")
    swap = _per_layer_queries(rows, "c_res", condition=f"swap={kind}")
    if not swap:
        return None
    orig = sum(_early_square_sum(base[l], k) for l in base)
    new = sum(_early_square_sum(swap[l], k) for l in swap)
    return 1 - new / orig if orig > 0 else None


def per_layer(rows) -> dict:
    out = {
        m: _by_layer(rows, m)
        for m in (
            "probe_r2",
            "probe_r2_log",
            "probe_mae",
            "probe_mae_log",
            "probe_mae_mean",
            "abs_share",
        )
    }
    out["probe_r2_log_interval"] = {  # 95% bootstrap interval over held-out sequences
        r["layer"]: [r["lo"], r["hi"]]
        for r in rows
        if r["metric"] == "probe_r2_log" and r["condition"] is None and r["head"] is None
    }
    c_res = _per_layer_queries(rows, "c_res")
    out["c_res_early"] = {
        l: math.sqrt(_early_square_sum(c, EARLY) / (EARLY - 1)) for l, c in c_res.items()
    }
    out["c_content"] = {
        l: _mean(c.values()) for l, c in _per_layer_queries(rows, "c_content").items()
    }
    out["c_mask"] = {l: _mean(c.values()) for l, c in _per_layer_queries(rows, "c_mask").items()}
    alpha = defaultdict(list)
    early = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] == "sink_alpha0":
            alpha[r["layer"]].append(r["value"])
        elif r["metric"] == "a0_early":
            early[r["layer"]][r["head"]].append(r["value"])
    out["alpha0_max"] = {l: max(v) for l, v in alpha.items()}
    out["a0_early_max"] = {l: max(_mean(v) for v in heads.values()) for l, heads in early.items()}
    out["sink_rate"] = {r["layer"]: r["value"] for r in rows if r["metric"] == "sink_rate"}
    for cond in ("bos", "nobos"):
        out[f"fingerprint_dispersion_{cond}"] = _by_layer(
            rows, "fingerprint_dispersion", condition=cond
        )
    for kind in KINDS:
        out[f"bos_swap_removed_{kind}_k{EARLY}"] = _by_layer(
            rows, "bos_swap_removed", condition=f"{kind},k={EARLY}"
        )
    out["knockout_probe_r2_log"] = _by_layer(rows, "knockout_probe_r2_log", condition="layer=all")
    out["shift_js"] = {
        r["layer"]: r["value"] for r in rows if r["metric"] == "shift_js" and r["condition"]
    }
    return out


def headline(rows, layers: dict, val_loss: float | None) -> dict:
    """One number per run for each comparison row (None where not measured)."""

    def last(d):
        return d[max(d)] if d else None

    out = {
        "val_loss": val_loss,
        "probe_r2_log_last": last(layers["probe_r2_log"]),
        "probe_r2_log_mean": _mean(v for k, v in layers["probe_r2_log"].items() if k >= 1),
        "c_res_early": _mean(layers["c_res_early"].values()),
        "c_content": _mean(layers["c_content"].values()),
        "abs_share": _mean(layers["abs_share"].values()),
        "alpha0_max": max(layers["alpha0_max"].values(), default=None),
        "a0_early_max": max(layers["a0_early_max"].values(), default=None),
        "sink_rate": _mean(layers["sink_rate"].values()),
        "fingerprint_nobos_last": last(layers["fingerprint_dispersion_nobos"]),
        "shift_js": _mean(layers["shift_js"].values()),
    }
    for kind in KINDS:
        out[f"bos_swap_removed_{kind}_k{EARLY}"] = removed_over_layers(rows, kind, EARLY)
    knocked = last(layers["knockout_probe_r2_log"])
    if knocked is not None and out["probe_r2_log_last"] is not None:
        out["knockout_probe_r2_log_drop"] = out["probe_r2_log_last"] - knocked
    for r in rows:
        if r["metric"] == "loss_beyond_train" and r["value"] is not None:
            out["loss_beyond_" + r["condition"].replace("=", "").replace(",", "_")] = r["value"]
    return out


def summarise(analysis, seconds: float) -> dict:
    """summary.json of an Analysis that has run."""
    rows = analysis.rec.rows
    subject = analysis.subject
    layers = per_layer(rows)
    model = analysis.model
    return {
        **analysis.label,
        "definitions": DEFINITIONS,
        "posleak": version(),
        **subject.info,
        "position": model.cfg.position,
        "window": model.cfg.window,
        "rope_base": model.rope_effective_base,
        "rope_scale": analysis.opts.rope_scale,  # NTK applied at inference (None: none)
        "seqs": analysis.opts.seqs,
        "seq_len": analysis.T,
        "data": subject.data,
        "bos": analysis.bos,
        "seconds": round(seconds, 2),
        "timings": analysis.timings,
        "per_layer": layers,
        "headline": headline(rows, layers, subject.info.get("val_loss")),
    }


def run_report(summary: dict, figure: str) -> str:
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
        f"| attention layer | C_res RMS over queries 1–{EARLY - 1} | abs_share | α₀ of the "
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
