"""`posleak study SWEEP_DIR [--out DIR] [--seqs N]`: the study's report (default runs/study).

Reads the finished runs of a study sweep (configs/sweeps/study.toml or study-small.toml),
analyses any that are not yet analysed (full-attention runs with the windowed variant's w, so
that the window contrast reads the same pairs in both), adds the study's own analyses (every
text variant at initialisation, the reference variant at 4x its training length with and
without NTK at inference, and its first seed at every kept checkpoint), and writes report.md
in the definitions of docs/science.md. The variants' roles (reference, control, window,
NTK) come from the sweep's [study] table. Every number and sentence is computed from the
records. Each verdict table is one Holm family of paired-by-seed t-tests (against the
reference, or against 0 for a within-run contrast); below 6 seeds the exact sign-flip p
stands beside, and every null names its minimum detectable effect.
"""

from __future__ import annotations

from pathlib import Path

from posleak.analysis.engine import provenance
from posleak.analysis.engine.options import Options
from posleak.analysis.engine.records import matches
from posleak.analysis.maths.measures import DEFINITIONS, uniform_alpha
from posleak.analysis.maths.seeds import MIN_SEEDS, mean_interval
from posleak.analysis.reports import compare, plots, results
from posleak.analysis.reports.bos_shares import (
    BROKEN_NATS,
    PARTS_V4,
    family_sentence,
    intact_signal_rows,
    removed_by_seed,
    share_cell,
    signal_over_floor,
    swap_passes,
)
from posleak.analysis.reports.routes import intervention_routes
from posleak.analysis.reports.study import (
    STEP0,
    Study,
    by_records,
    decided,
    fingerprint_bos_max,
    headline,
    level,
    loss_curves,
    per_seed,
    val_curve,
    write_sections,
    zeros,
)
from posleak.analysis.reports.verdicts import Verdicts
from posleak.analysis.stages.bos_swap import PASSES
from posleak.analysis.stages.knockout_loss import EXCESS
from posleak.data import make_source
from posleak.report import number, table
from posleak.train import checkpoint
from posleak.train.rundir import RunDir

SOURCE_REMOVED = 0.4  # the source study's share removed by replacing BOS (early queries)


# ---------------------------------------------------------------- numbers per run
def layer_slope(records: list[dict], metric: str, condition: dict | None) -> float | None:
    """Least-squares slope over layers >= 1 of a per-layer metric: growth with depth (the same
    layer set as the pooled level, version 3 item 4)."""
    points = [
        (r["layer"], r["value"])
        for r in records
        if r["metric"] == metric
        and matches(r, condition)
        and r["head"] is None
        and r["layer"] is not None
        and r["layer"] >= 1
        and r["value"] is not None
    ]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def difference(number_of):
    """A per-run number that is the difference of two headline numbers (None if either is)."""

    def of(summary):
        a, b = number_of(summary)
        return None if a is None or b is None else a - b

    return of


# ---------------------------------------------------------------- the three claims
def squared(number_of):
    """A clamped root's number as the signed square it came from (a floor in C² units)."""
    return lambda summary: None if number_of(summary) is None else number_of(summary) ** 2


def claim_a(study: Study, out: Path) -> list[str]:
    w = study.window
    if not w:
        return ["## (a) Window against RoPE", "", "No window variant in this sweep."]
    T = study.opts.seq_len if study.opts.seq_len else study.runs_of(study.reference)[0]["seq_len"]
    k = study.opts.early_queries
    numbers = {
        "window": (f"C² at i ≥ {w}, window's pairs (signed)", headline("c_res_window_signed_mean")),
        "floor": ("its no-signal floor (C²)", squared(headline("c_res_window_floor"))),
        "share": (f"abs_share at i ≥ {w}", headline("abs_share_window")),
        "tail": (f"probe R² at positions ≥ {w} (last layer)", headline("probe_tail_r2_log_last")),
        "early": (f"C²_content at i < {k} (signed)", headline("c_res_content")),
    }
    slope = {
        v: by_records(study, v, lambda r: layer_slope(r, "c_res_window_signed", {"w": w}))
        for v in study.text
    }
    rows = [
        [
            v,
            *(level(per_seed(study.runs_of(v), f)) for _, f in numbers.values()),
            level(slope[v]),
        ]
        for v in study.text
    ]
    ref = {key: per_seed(study.runs_of(study.reference), f) for key, (_, f) in numbers.items()}
    cells = []
    if study.window_variant in study.summaries:
        mine = {
            key: per_seed(study.runs_of(study.window_variant), f) for key, (_, f) in numbers.items()
        }
        for key in ("window", "share", "tail"):
            cells.append(
                (
                    f"`{study.window_variant}` − `{study.reference}`: {numbers[key][0]}",
                    mine[key],
                    ref[key],
                )
            )
        cells.append(
            (
                f"`{study.window_variant}` − `{study.reference}`: slope over layers ≥ 1",
                slope[study.window_variant],
                slope[study.reference],
            )
        )
    if study.ntk in study.summaries:
        mine = {key: per_seed(study.runs_of(study.ntk), f) for key, (_, f) in numbers.items()}
        for key in ("early", "window"):
            cells.append(
                (f"`{study.ntk}` − `{study.reference}`: {numbers[key][0]}", mine[key], ref[key])
            )
    verdicts = Verdicts(cells)
    curves = {
        v: [
            {
                float(r["layer"]): r["value"]
                for r in rows_
                if r["metric"] == "c_res_window_signed" and r["value"] is not None
            }
            for rows_ in study.groups[v]
        ]
        for v in study.text
    }
    fig = plots.seed_curves(
        out / "claim_a_window_by_layer",
        curves,
        "layer",
        f"signed C_res² at i ≥ {w}",
        f"Residual component where the window binds (i ≥ {w}, window's pairs)",
    )
    said = []
    if cells and study.window_variant in study.summaries:
        said.append(
            f"Window − RoPE where the window binds (the claim: higher): "
            f"{verdicts.words(cells[0][0])}."
        )
    if study.ntk in study.summaries:
        ntk_early = f"`{study.ntk}` − `{study.reference}`: {numbers['early'][0]}"
        said.append(f"NTK − RoPE at early queries (the claim: lower): {verdicts.words(ntk_early)}.")
    lines = [
        "## (a) Does the residual component order NTK < RoPE < window?",
        "",
        f"A window of {w} keys computes what full attention computes at queries i < {w}, so "
        f"the window contrast reads queries {w}–{T - 1} only, on the window's pairs "
        f"(j > i − {w}) in both models: a two-way fit on that pair set, the split-half signal "
        "pooled over heads and averaged over layers ≥ 1, signed (a C²; the seeds are compared "
        "on it, and its floor, from both halves' sign flips, is squared to match). abs_share "
        "and the probe are read there too; the slope is over layers ≥ 1; NTK against RoPE "
        "reads the content keys' early-query C² (version 4). " + " ".join(said),
        "",
        *table(
            [
                "variant",
                *(label for label, _ in numbers.values()),
                "slope of signed C_res² at i ≥ w",
            ],
            rows,
        ),
        "",
        "Claim (a), one Holm family:",
        "",
        *verdicts.table(f"`{study.reference}`"),
        "",
        f"![window contrast by layer]({fig})",
    ]
    return decided(study, out, lines, verdicts, "verdict_a", None)


def claim_b(study: Study, out: Path) -> list[str]:
    k = study.opts.early_queries

    def loss(kind: str, how: str):
        return headline(PASSES[how].loss, swap=kind, queries="early", **PASSES[how].condition)

    rows = [
        [
            v,
            PASSES[how].label.format(kind=kind),
            *(share_cell(study.runs_of(v), kind, p, how) for p, _ in PARTS_V4),
            level(per_seed(study.runs_of(v), loss(kind, how))),
        ]
        for v in study.text
        for kind, how in swap_passes(study.opts)
    ]
    kinds = sorted(study.opts.swaps, key=lambda kind: kind != "mean")  # BOS → mean first
    removed = {
        kind: removed_by_seed(study.runs_of(study.reference), kind, "content")[0] for kind in kinds
    }
    cells = [
        (f"`{study.reference}`, BOS → {kind}, content keys", values, zeros(values))
        for kind, values in removed.items()
    ]
    if study.control in study.summaries and "mean" in removed:
        control = removed_by_seed(study.runs_of(study.control), "mean", "content")[0]
        cells.append(
            (
                f"`{study.reference}` − `{study.control}`, BOS → mean, content keys",
                removed["mean"],
                control,
            )
        )
    verdicts = Verdicts(cells, primary="mean" in removed)
    fit = min(study.opts.fit_queries, study.runs_of(study.reference)[0]["seq_len"])
    lines = [
        "## (b) What share of the residual component at early queries does replacing BOS remove?",
        "",
        f"The share of the signed split-half signal at queries 1–{k - 1} removed when the BOS "
        f"embedding is replaced, from the local fit (queries below {fit}), summed over layers "
        "≥ 1 and divided once (layer 0's key-0 logit is the embedding's own). The content part "
        "comes from a fit on the keys j ≥ 1 only, so BOS's own logit cannot leak into it; key "
        "0 is read against that fit (its variation over queries: position read against BOS). "
        "Negative: the replacement adds signal. A seed whose loss at those queries rose by "
        f"more than {BROKEN_NATS:g} nat is left out of a share (model broken, counted). The "
        f"loss change is at the same early positions (nats). {family_sentence(study.opts)}"
        "Answer: "
        f"{_against_source(study, verdicts)}" + signal_over_floor(study, study.reference),
        "",
        *table(["", *study.text], intact_signal_rows(study, study.text)),
        "",
        *table(
            [
                "variant",
                "replacement",
                *(f"removed, {label}" for _, label in PARTS_V4),
                f"loss change, i < {k}",
            ],
            rows,
        ),
        "",
        "Claim (b): BOS → mean's content-key share against 0 is the primary cell, tested "
        "first at 0.05; the other replacements and the contrast with the learned-sink control "
        f"`{study.control}` form a Holm family tested only when it is a finding:",
        "",
        *verdicts.table("0 / the control"),
    ]
    unit = "removed share, content keys − 0 or the control"
    return decided(study, out, lines, verdicts, "verdict_b", unit)


def _against_source(study: Study, verdicts: Verdicts) -> str:
    """RoPE's BOS→mean removed share (content keys) against 0 and the source study's 40%."""
    values = removed_by_seed(study.runs_of(study.reference), "mean", "content")[0]
    found = mean_interval(values.values())
    if found is None:
        return f"`{study.reference}`'s BOS → mean was not measured."
    m, lo, hi, n = found
    said = f"for RoPE, BOS → frequency-weighted mean removes {m:.0%} of the content-key part"
    if n < 2:
        return said + " (one seed: no interval)."
    source = "includes" if lo <= SOURCE_REMOVED <= hi else "excludes"
    verdict = verdicts.words(f"`{study.reference}`, BOS → mean, content keys")
    return (
        f"{said} ([{lo:.0%}, {hi:.0%}] over {n} seeds; against 0: {verdict}); the interval "
        f"{source} the source study's {SOURCE_REMOVED:.0%}."
    )


def claim_c(study: Study, out: Path) -> list[str]:
    opts = study.opts
    series = (
        ("sink heads (all layers)", headline("knockout_sink_heads")),
        ("α₀, strongest head", headline("alpha0_max")),
        ("α₀ of uniform attention", headline("alpha0_uniform")),
        ("λ₀, strongest head", headline("lift0_max")),
        ("value drain, smallest head", headline("value_drain_min")),
        ("massive activation, largest", headline("massive_ratio_max")),
        ("x₀ dispersion with BOS (max)", fingerprint_bos_max),
        ("mass moved, key 0's knockout", headline("moved_mass", key=0)),
        ("mass moved, random-key control", headline("moved_mass", key="random")),
    )
    rows = [
        [v, *(level(per_seed(study.runs_of(v), f)) for _, f in series)] for v in study.summaries
    ]
    with_sinks = [
        v
        for v in study.summaries
        if any((results.value(s, "knockout_sink_heads") or 0) > 0 for s in study.runs_of(v))
    ]
    bos_max = max(
        (fingerprint_bos_max(s) or 0.0 for items in study.summaries.values() for s in items),
        default=0.0,
    )
    cells = []
    runs = [s for v in study.text for s in study.runs_of(v)]
    study.prefetch([(s, STEP0, study.at_step(s, 0)) for s in runs])
    beyond_key1 = difference(
        lambda s: (
            results.value(s, "knockout_probe_refit_r2_log_key1_last"),
            results.value(s, "knockout_probe_refit_r2_log_last"),
        )
    )
    for v in study.text:
        excess = learned(study, v, headline("knockout_loss_change", key=EXCESS, heads="all"))
        cells.append(
            (
                f"`{v}`: loss, key-0 knockout minus random-key control, trained − step 0",
                excess,
                zeros(excess),
            )
        )
        left = learned(study, v, beyond_key1)
        cells.append(
            (
                f"`{v}`: position R² removed by key 0 beyond key 1 (refit), trained − step 0",
                left,
                zeros(left),
            )
        )
    verdicts = Verdicts(cells)
    where = ", ".join(f"`{v}`" for v in with_sinks) if with_sinks else "no variant"
    fingerprint = (
        "identical across inputs (dispersion exactly 0 in every run and layer)"
        if bos_max == 0
        else f"not identical across inputs (largest dispersion {bos_max:.2g})"
    )
    uniform = (
        uniform_alpha(study.runs_of(study.reference)[0]["seq_len"], None)
        if study.reference in study.summaries
        else None
    )
    lines = [
        "## (c) Do sink heads form, and is their position-0 output identical across inputs?",
        "",
        f"A sink head has α₀ > {opts.sink_eps:g} and λ₀ ≥ {opts.sink_lift:g} (key 0 gets at "
        f"least {opts.sink_lift:g}× its uniform share); α₀ stands beside its uniform baseline "
        f"({number(uniform, 2)} for full attention at this length). Answer: sink heads form in "
        f"{where}. With BOS at position 0 the position-0 output of every run is {fingerprint}.",
        "",
        *table(["variant", *(label for label, _ in series)], rows),
        "",
        "Did the model learn to lean on key 0? Loss change when key 0 is knocked out in every "
        "layer, minus the change when a random earlier key is knocked out instead (nats; the "
        "mass each moves is in the table above: a random-key control, not an equal-mass one), "
        "and the probe R² that a refit probe loses when key 0 is knocked out beyond "
        "what it loses when key 1 is (both bounded: refit R², not the original probe's "
        "transfer). Each is the trained run minus the same seed at step 0: at initialisation "
        "the mask already dilutes BOS's value as 1/(i + 1), so a knockout removes position "
        "before any learning. Claim (c), one Holm family:",
        "",
        *verdicts.table("0"),
    ]
    return decided(study, out, lines, verdicts, "verdict_c", None)


def learned(study: Study, variant: str, number_of) -> dict:
    """{seed: number_of(trained) − number_of(the same seed at step 0)} (None where either
    is undefined): what training added, the quantity a claim about learning rests on."""
    out = {}
    for s in study.runs_of(variant):
        trained, initial = number_of(s), number_of(study.extra(s, STEP0, study.at_step(s, 0)))
        out[s["seed"]] = None if trained is None or initial is None else trained - initial
    return out


# ---------------------------------------------------------------- the rest of the picture
def step_zero(study: Study, out: Path) -> list[str]:
    """Every text variant's first seed at initialisation (version 3, item 10), beside the
    same run trained."""
    series = (
        ("C_mask, mean", lambda s: _mean(s["per_layer"]["c_mask"].values())),
        ("C_res i < K (v3)", headline("c_res_deep", part="all")),
        ("its floor", headline("c_res_deep_floor", part="all")),
        ("probe R² (last)", headline("probe_r2_log_last")),
        ("λ₀ max", headline("lift0_max")),
    )
    rows, missing = [], []
    study.prefetch(
        [
            (study.runs_of(v)[0], STEP0, study.at_step(study.runs_of(v)[0], 0))
            for v in study.text
            if any(
                checkpoint.step_of(p) == 0 for p in RunDir(study.runs_of(v)[0]["run"]).checkpoints()
            )
        ]
    )
    for v in study.text:
        first = study.runs_of(v)[0]
        if not any(checkpoint.step_of(p) == 0 for p in RunDir(first["run"]).checkpoints()):
            missing.append(v)
            continue
        at0 = study.extra(first, STEP0, study.at_step(first, 0))
        for label, s in (("step 0", at0), (f"step {first['step']}", first)):
            rows.append([v, label, *(number(f(s), 3) for _, f in series)])
    if not rows:
        return [
            "## At initialisation",
            "",
            "No run keeps a step-0 checkpoint (set `train.ckpt_initial = true`).",
        ]
    at0 = [r for r in rows if r[1] == "step 0"]
    trained = [r for r in rows if r[1] != "step 0"]

    def span(rows_: list, column: int) -> str:
        values = [float(r[column]) for r in rows_ if r[column] != "–"]
        return f"{min(values):.3g}–{max(values):.3g}" if values else "–"

    above = sum(1 for r in at0 if "–" not in (r[3], r[4]) and float(r[3]) > float(r[4]))
    return [
        "## At initialisation",
        "",
        f"The first seed of every text variant analysed at step 0 (its initial weights) and "
        f"trained. At step 0, C_mask averages {span(at0, 2)} (trained {span(trained, 2)}), the "
        f"early-query residual component is {span(at0, 3)} (trained {span(trained, 3)}; above "
        f"its no-signal floor in {above} of {len(at0)} variants) and the probe's R² at the "
        f"last layer is {span(at0, 5)} (trained {span(trained, 5)})."
        + (f" No step-0 checkpoint: {', '.join(missing)}." if missing else ""),
        "",
        *table(["variant", "weights", *(label for label, _ in series)], rows),
    ]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def training(study: Study, out: Path) -> list[str]:
    rows = []
    for v in study.summaries:
        runs = [RunDir(s["run"]) for s in study.runs_of(v)]
        done = [r.summary() for r in runs]
        minutes = [d["elapsed_s"] / 60 for d in done]
        speed = [d["tokens"] / d["elapsed_s"] for d in done]
        rows.append(
            [
                v,
                str(done[0]["steps"]),
                level(per_seed(study.runs_of(v), headline("val_loss"))),
                _floors(runs[0]),
                f"{sum(minutes) / len(minutes):.1f}",
                f"{sum(speed) / len(speed):,.0f}",
            ]
        )
    fig = loss_curves(
        out, {v: [RunDir(s["run"]) for s in study.runs_of(v)] for v in study.summaries}
    )
    return [
        "## Training: loss curves and the cost of one run",
        "",
        "Wall time is that of one run on one core of a 2-core CPU (two runs at a time, while "
        "other work shared the machine, so an upper bound). For a synthetic corpus, the loss "
        "floors are the chain's entropy rate and its unigram entropy, in nats.",
        "",
        *table(
            [
                "variant",
                "steps",
                "final validation loss",
                "floor / unigram",
                "min per run",
                "tok/s",
            ],
            rows,
        ),
        "",
        f"![validation loss]({fig})",
    ]


def _floors(run: RunDir) -> str:
    """Entropy rate / unigram entropy of a Markov run's corpus; '–' for text."""
    data = run.read_config()[0].data
    if data.source != "markov":
        return "–"
    chain = make_source(data)
    return f"{chain.entropy_rate():.3g} / {chain.unigram_entropy():.3g}"


def position_readout(study: Study, out: Path) -> list[str]:
    text = {v: study.groups[v] for v in study.text}
    markov = {v: study.groups[v] for v in study.markov}
    figs = [plots.figure(out / "probe_text", lambda ax: plots.probe_curve(ax, text))]
    if markov:
        figs.append(plots.figure(out / "probe_markov", lambda ax: plots.probe_curve(ax, markov)))
    numbers = (
        ("probe R² (last layer)", headline("probe_r2_log_last")),
        ("refit R² after key-0 knockout", headline("knockout_probe_refit_r2_log_last")),
        ("after key-1 knockout", headline("knockout_probe_refit_r2_log_key1_last")),
        ("with key 0's gain flattened", headline("route2_r2_left_last", rule="write")),
        ("one head's key-0 knockout, lowest", headline("head_knockout_r2_left_min")),
        ("C_mask (mean)", lambda s: _mean(s["per_layer"]["c_mask"].values())),
        ("shift-test JS", headline("shift_js")),
    )
    rows = [
        [v, *(level(per_seed(study.runs_of(v), f)) for _, f in numbers)] for v in study.summaries
    ]
    return [
        "## Where absolute position becomes decodable, and which route carries it",
        "",
        "Held-out R² of a cross-validated ridge probe for log(1 + position) at each residual "
        "site, on text"
        + (" and on the stationary Markov corpus (whose data carry no position)" if markov else "")
        + ". "
        "After each intervention the probe is refit on the intervened states (the position "
        "information left, bounded like any R²): key 0 knocked out in every layer, the key-1 "
        "control, key 0's attention replaced by its mean over queries in every head (the "
        "route-2 test: the position-dependent gain removed, the mean kept), and key 0 knocked "
        f"out in one head at a time (the top {study.opts.top_heads} heads by λ₀).",
        "",
        *(f"![probe]({f})" for f in figs),
        "",
        *table(["variant", *(label for label, _ in numbers)], rows),
    ]


def extrapolation(study: Study, out: Path) -> list[str]:
    text = {v: study.groups[v] for v in study.text}
    fig = plots.figure(out / "extrapolation", lambda ax: plots.extrapolation_curve(ax, text))
    beyond = results.number("loss_beyond_train")
    columns = [
        c
        for c in beyond.values_of(study.opts)
        if any(
            headline(beyond.name, **c)(s) is not None for v in study.text for s in study.runs_of(v)
        )
    ]
    rows = [
        [v, *(level(per_seed(study.runs_of(v), headline(beyond.name, **c))) for c in columns)]
        for v in study.text
    ]
    return [
        "## Length extrapolation (loss beyond the training length, nats)",
        "",
        *table(["variant", *(f"{c['multiple']}× T, NTK {c['ntk']}" for c in columns)], rows),
        "",
        f"![extrapolation]({fig})",
    ]


def four_times(study: Study, summary: dict, scale: float | None) -> Options:
    """The options of a reference run's analysis at 4x its training length."""
    return Options(
        seqs=max(8, study.seqs // 4),
        seq_len=4 * summary["seq_len"],
        rope_scale=scale,
        swaps=(),
        knockout=False,
        extrapolation=(),
    )


def inference_ntk(study: Study, out: Path) -> list[str]:
    """The reference runs at 4x their training length, without and with NTK scaling s = 4:
    the local early-query statistic reads the same queries at every length."""
    numbers = {scale: {"probe": {}, "c_res": {}} for scale in (None, 4.0)}
    study.prefetch(
        [
            (s, "analysis-4x" + (f"-ntk{scale:g}" if scale else ""), four_times(study, s, scale))
            for scale in numbers
            for s in study.runs_of(study.reference)
        ]
    )
    for scale in numbers:
        for s in study.runs_of(study.reference):
            opts = four_times(study, s, scale)
            extra = study.extra(s, "analysis-4x" + (f"-ntk{scale:g}" if scale else ""), opts)
            numbers[scale]["probe"][s["seed"]] = results.value(extra, "probe_r2_log_last")
            numbers[scale]["c_res"][s["seed"]] = results.value(extra, "c_res_deep", part="all")
    trained = {
        "probe": per_seed(study.runs_of(study.reference), headline("probe_r2_log_last")),
        "c_res": per_seed(study.runs_of(study.reference), headline("c_res_deep", part="all")),
    }
    rows = [["1× (trained length)", level(trained["probe"]), level(trained["c_res"])]]
    rows += [
        [f"4×, s = {scale or 1:g}", level(n["probe"]), level(n["c_res"])]
        for scale, n in numbers.items()
    ]
    verdicts = Verdicts(
        [
            (
                "4× s = 4 − 4× s = 1: C_res at early queries",
                numbers[4.0]["c_res"],
                numbers[None]["c_res"],
            ),
            ("4× s = 4 − 4× s = 1: probe R²", numbers[4.0]["probe"], numbers[None]["probe"]),
        ]
    )
    return [
        f"## `{study.reference}` at 4× its training length, with and without NTK at inference",
        "",
        f"On {max(8, study.seqs // 4)} sequences per analysis; the early-query C_res is the "
        "local one (fit on the first queries only), so it compares across lengths.",
        "",
        *table(
            ["analysed at", "probe R² (last layer)", f"C_res, i < {study.opts.early_queries} (v3)"],
            rows,
        ),
        "",
        *verdicts.table("s = 1"),
    ]


def emergence(study: Study, out: Path) -> list[str]:
    """The first seed of the reference variant at every kept checkpoint (step 0 included
    when the run kept it)."""
    first = study.runs_of(study.reference)[0]
    steps = [checkpoint.step_of(p) for p in RunDir(first["run"]).checkpoints()]
    by_step = {}
    study.prefetch(
        [(first, f"analysis-step{t}", study.at_step(first, t)) for t in steps if t != first["step"]]
    )
    for step in steps:
        if step == first["step"]:
            by_step[step] = first
        else:
            by_step[step] = study.extra(first, f"analysis-step{step}", study.at_step(first, step))
    series = (
        ("λ₀ (strongest head)", headline("lift0_max")),
        ("α₀ (strongest head)", headline("alpha0_max")),
        ("α₀ uniform", headline("alpha0_uniform")),
        ("C_res i < K (v3)", headline("c_res_deep", part="all")),
        (
            "BOS → mean removed, content",
            headline("bos_swap_removed_share", swap="mean", part="content"),
        ),
        ("probe R² (last)", headline("probe_r2_log_last")),
    )
    rows = [
        [str(step), *(number(f(s), 3) for _, f in series)] for step, s in sorted(by_step.items())
    ]
    curves = {
        label: [{step: f(s) for step, s in by_step.items()}]
        for label, f in (series[0], series[3], series[5])
    }
    fig = plots.seed_curves(
        out / "emergence",
        curves,
        "training step",
        "value",
        f"{study.reference}, seed {first['seed']}, over training",
    )
    return [
        f"## Over training (`{study.reference}`, seed {first['seed']})",
        "",
        *table(["step", *(label for label, _ in series)], rows),
        "",
        f"![emergence]({fig})",
    ]


# ---------------------------------------------------------------- the report
def scale_note(study: Study, out: Path) -> list[str]:
    nulls = sum(verdicts.nulls for _, verdicts in study.families)
    first = study.runs_of(study.reference)[0]
    run = RunDir(first["run"])
    cfg, _ = run.read_config()
    curve = val_curve(run)
    steps = sorted(curve)
    last_drop = curve[steps[-2]] - curve[steps[-1]] if len(steps) > 1 else None
    minutes = run.summary()["elapsed_s"] / 60
    m = cfg.model
    lines = [
        "## Scale, and what a larger study needs",
        "",
        f"Every text run: {m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} heads, "
        f"context {cfg.data.seq_len}, batch {cfg.train.batch_size}, {cfg.train.steps} steps "
        f"({cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len / 1e6:.1f}M tokens), "
        f"{len(study.runs_of(study.reference))} seeds per variant. Validation loss of "
        f"`{study.reference}` "
        f"seed {first['seed']} fell by {number(last_drop, 3)} over its last "
        f"{steps[-1] - steps[-2] if len(steps) > 1 else 0} steps, so training had "
        f"{'not yet' if (last_drop or 0) > 0.01 else 'nearly'} flattened. One run took "
        f"{minutes:.1f} minutes on one CPU core; the cost grows linearly with steps and seeds.",
    ]
    if nulls:
        lines += [
            "",
            f"{nulls} contrast{'s' if nulls != 1 else ''} of the verdict tables "
            f"{'are' if nulls != 1 else 'is'} not detected at this scale: each names the "
            "smallest effect these seeds could have detected (MDE, 80% power); the detectable "
            "effect shrinks as 1/√seeds, so halving it takes four times the seeds.",
        ]
    return lines


def header(study: Study, out: Path) -> list[str]:
    finished = sum(len(v) for v in study.summaries.values())
    first = RunDir(study.runs_of(study.reference)[0]["run"]).read_config()[0]
    return [
        f"# The study: where absolute position comes from, at {first.model['n_layer']} layers "
        f"and context {first.data.seq_len}",
        "",
        f"Generated by `posleak study` (sweep `{study.sweep_dir.name}`, {study.seqs} held-out "
        f"sequences per analysis) from the records of {finished} finished runs (of "
        f"{study.planned} planned) in {len(study.summaries)} variants; definitions version "
        f"{DEFINITIONS} ({compare.definitions_link(out)}). Made by "
        f"{provenance.line(provenance.provenance())} Differences are paired by seed. Each verdict "
        "table is one Holm family of paired t-tests; **finding** marks a Holm p < 0.05 with "
        f"at least {MIN_SEEDS} seeds; a null names its minimum detectable effect (MDE, 80% "
        f"power). Every measurement of every variant, side by side: `posleak compare "
        f"{study.sweep_dir}`.",
    ]


def routes(study: Study, out: Path) -> list[str]:
    return intervention_routes(study, study.text)


SECTIONS = (  # the claims first: their families make the verdict box
    claim_a,
    claim_b,
    claim_c,
    routes,
    step_zero,
    inference_ntk,
    emergence,
    position_readout,
    extrapolation,
    training,
    scale_note,
)


STEP0_STAGES = ("probe", "mean_logits", "sinks", "knockout", "knockout_loss", "route2")
# what this report reads at step 0: C_mask, C_res and its floor, the probe, λ₀, the knockouts
# and the routes (the BOS family, extrapolation, anchoring and fingerprint are read trained)


def write_report(study: Study, out: Path) -> Path:
    if study.reference in study.summaries:  # its first seed's checkpoints are all read whole
        study.full_run = (study.reference, study.runs_of(study.reference)[0]["seed"])
    study.step0_stages = STEP0_STAGES
    return write_sections(study, out, header, SECTIONS)
