"""`posleak study SWEEP_DIR` on a Bigram-Backcopy sweep (configs/sweeps/sinks.toml): the sink
study's report.

The sweep's variants train on a corpus where attention sinks form within a few hundred steps,
so claims (b) and (c), which are about sinks, can be tested on a CPU. Every number and
sentence of report.md is computed from the records. Each verdict table is one Holm family of
paired-by-seed t-tests (against `rope`, or against 0 for within-run contrasts); below 6 seeds
the exact sign-flip p stands beside, and every null names its minimum detectable effect.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from posleak.analysis.engine import provenance
from posleak.analysis.engine.records import finite_mean
from posleak.analysis.maths.measures import DEFINITIONS
from posleak.analysis.maths.seeds import mean_interval
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
    Study,
    by_records,
    fingerprint_bos_max,
    headline,
    level,
    loss_curves,
    per_seed,
    write_sections,
    zeros,
)
from posleak.analysis.reports.verdicts import Verdicts, forest_figure
from posleak.analysis.stages.bos_swap import PASSES
from posleak.analysis.stages.knockout_loss import EXCESS
from posleak.data import make_source
from posleak.model.rope import ntk_base, turning_pairs
from posleak.report import number, table
from posleak.train import checkpoint
from posleak.train.rundir import RunDir

EMERGENCE_SEEDS = 3  # rope seeds analysed at every checkpoint


# ---------------------------------------------------------------- numbers per run
def has_sink(summary: dict) -> float:
    """1 when some head is a sink (alpha_0 > eps and lambda_0 >= lift), else 0."""
    return float((results.value(summary, "knockout_sink_heads") or 0) > 0)


def virtual_mass(records: list[dict]) -> float | None:
    """The largest per-head attention mass on a learned sink logit (None without one)."""
    values = [r["value"] for r in records if r["metric"] == "sink_virtual_mass"]
    return max(values) if values else None


# ---------------------------------------------------------------- sections
def training(study: Study, out: Path) -> list[str]:
    first = study.runs_of(study_variants(study)[0])[0]
    source = make_source(RunDir(first["run"]).read_config()[0].data)
    rows = []
    runs = {v: [RunDir(s["run"]) for s in study.runs_of(v)] for v in study_variants(study)}
    for v in study_variants(study):
        finals = [final_metrics(run) for run in runs[v]]
        rows.append(
            [
                v,
                str(len(finals)),
                level({i: f.get("val_loss") for i, f in enumerate(finals)}),
                level({i: f.get("val_copy_loss") for i, f in enumerate(finals)}),
                level({i: f.get("val_bigram_loss") for i, f in enumerate(finals)}),
            ]
        )
    return [
        "## Training",
        "",
        f"Loss floors of the corpus: {source.bigram_floor():.4f} nats on non-copy targets "
        f"(the bigram chain's), 0 on copies; copies are {source.copy_fraction():.1%} of "
        f"tokens, so the overall floor is {source.entropy_rate():.4f}.",
        "",
        *table(["variant", "seeds", "val loss", "copy loss", "bigram loss"], rows),
        "",
        f"![validation loss]({loss_curves(out, runs)})",
    ]


def final_metrics(run: RunDir) -> dict:
    evaluated = _evaluations(run)
    return evaluated[-1] if evaluated else {}


def claim_c(study: Study, out: Path) -> list[str]:
    opts = study.opts
    series = (
        ("sink heads", headline("knockout_sink_heads"), False),
        ("α₀ of the strongest head", headline("alpha0_max"), False),
        ("λ₀ of the strongest head", headline("lift0_max"), False),
        ("value drain ‖W_O v₀‖ / median (smallest head)", headline("value_drain_min"), False),
        ("massive activation ‖x₀‖ / median (largest)", headline("massive_ratio_max"), False),
        ("attention moved by key 0's knockout", headline("moved_mass", key=0), False),
        ("attention moved by the random-key control", headline("moved_mass", key="random"), False),
    )
    variants = study_variants(study)
    groups = {v: study.groups[v] for v in variants}
    formed = [f"{sum(has_sink(s) for s in study.runs_of(v)):.0f} of {len(study.runs_of(v))}"
              for v in variants]  # fmt: skip
    rows = [["seeds with a sink", *formed]] + [
        [label, *(level(per_seed(study.runs_of(v), f), percent) for v in variants)]
        for label, f, percent in series
    ]
    rows.append(
        ["mass on no key: sink logit, softpick (largest head)",
         *(level(by_records(study, v, virtual_mass)) for v in variants)]
    )  # fmt: skip
    lines = [
        "## (c) Do sinks form, where, and do they matter?",
        "",
        f"A sink is a head with α₀ > {opts.sink_eps:g} and λ₀ ≥ {opts.sink_lift:g} "
        f"(key 0 gets at least {opts.sink_lift:g}× its uniform share). Means over seeds with "
        "95% t-intervals.",
        "",
        *table(["", *variants], rows),
        "",
        f"![attention of the top heads]({plots.attention_maps(out / 'attention', groups)})",
        "",
        "Early-query attention of each variant's heads with the highest λ₀ (one seed each; "
        "a sink is the bright column at key 0).",
        "",
    ]
    ref = study.runs_of(study.reference)
    if ref:
        formed = sum(has_sink(s) for s in ref)
        lines.append(
            f"`{study.reference}` formed a sink in {formed:.0f} of {len(ref)} seeds."
            + (" " + _anchoring(study) if study.nobos in study.summaries else "")
        )
        lines.append("")
    lines += _stabilising(study, in_families(study), out)
    return lines


def _anchoring(study: Study) -> str:
    """Is the sink anchored to the BOS token or to position 0? From the no-BOS runs."""
    nobos = study.runs_of(study.nobos)
    formed = sum(has_sink(s) for s in nobos)
    with_bos = sum(has_sink(s) for s in study.runs_of(study.reference))
    dispersion = finite_mean(fingerprint_bos_max(s) for s in study.runs_of(study.reference))
    varying = finite_mean(results.value(s, "fingerprint_nobos_last") for s in nobos)
    if not with_bos:
        where = "with no sink in `rope`, where a sink is anchored cannot be read here"
    elif formed:
        where = "so a sink forms on position 0 whatever token is there, not only on BOS"
    else:
        where = "so in these seeds a sink formed only on the BOS token"
    return (
        f"Trained without BOS (`{study.nobos}`, position 0 holds an ordinary token), "
        f"{formed:.0f} of {len(nobos)} seeds formed a sink on key 0: {where}. The position-0 "
        f"output is identical across inputs with BOS (largest dispersion "
        f"{number(dispersion, 3)} in `{study.reference}`) and varies without it (last-layer "
        f"dispersion {number(varying, 3)} in `{study.nobos}`)."
    )


def _stabilising(study: Study, variants: list[str], out: Path) -> list[str]:
    cells = []
    for v in variants:
        excess = per_seed(
            study.runs_of(v), headline("knockout_loss_change", key=EXCESS, heads="sinks")
        )
        excess = {k: x for k, x in excess.items() if x is not None}
        if len(excess) >= 2:
            cells.append(
                (f"`{v}`: sink heads' key 0 minus random-key control", excess, zeros(excess))
            )
        every = per_seed(
            study.runs_of(v), headline("knockout_loss_change", key=EXCESS, heads="all")
        )
        cells.append((f"`{v}`: key 0 minus random-key control, every head", every, zeros(every)))
    family, question = Verdicts(cells), "(c) Does the model lean on key 0 beyond a random key?"
    study.families.append((question, family))
    return [
        "Does the model lean on its sink? The change of loss (on the non-copy targets where "
        "the corpus marks copies, else on every target) when key 0 "
        "is knocked out (its attention spread over the other keys), minus the change when a "
        "random earlier key is knocked out instead (nats). The two move different masses (the "
        "table above: key 0's knockout against the random key's, mean over queries, heads "
        "and layers), so this is a random-key control, not an equal-mass one. Sink-head rows "
        "use the seeds that formed one.",
        "",
        *family.table("0"),
        *forest_figure(family, out, "verdict_c", "loss change (nats) − 0", question),
    ]


def anchoring(study: Study, out: Path) -> list[str]:
    """(c), within each model: with BOS moved to position k, does the strongest head's lift
    follow it to key k or stay on key 0?"""
    ks = [k for k in study.opts.anchor_positions if k > 0]
    if not ks:
        return []
    variants = [v for v in study_variants(study) if v != study.nobos]

    def lift(v: str, k: int, key: str) -> dict:
        return per_seed(study.runs_of(v), headline("anchor_lift_max", k=k, key=key))

    rows = [
        [f"λ on {'BOS' if key == 'bos' else 'key 0'}, BOS at {k}"]
        + [level(lift(v, k, key)) for v in variants]
        for k in (0, *ks)
        for key in (("bos",) if k == 0 else ("bos", "start"))
    ]
    k = max(ks)
    said = []
    for v in variants:
        sink = mean_interval(lift(v, 0, "bos").values())
        bos, start = (mean_interval(lift(v, k, key).values()) for key in ("bos", "start"))
        if not sink or not bos or not start:
            continue
        if sink[0] < study.opts.sink_lift:
            said.append(f"`{v}` has no sink to move (λ {sink[0]:.2g} with BOS at 0)")
        elif bos[0] >= study.opts.sink_lift > start[0]:
            said.append(
                f"`{v}`'s sink follows BOS to key {k} (λ {bos[0]:.3g} there, key 0 {start[0]:.2g})"
            )
        elif start[0] >= study.opts.sink_lift > bos[0]:
            said.append(
                f"`{v}`'s sink stays on key 0 (λ {start[0]:.3g}; on BOS at {k}: {bos[0]:.2g})"
            )
        else:
            said.append(f"`{v}`: λ {bos[0]:.3g} on BOS at {k}, {start[0]:.3g} on key 0")
    return [
        "### Anchoring: does the sink follow the BOS token within a model?",
        "",
        f"Each model reads {study.opts.anchor_seqs} sequences with BOS moved to position k (k "
        "ordinary tokens before it); λ is the strongest head's lift on that key (the mean over "
        "the queries that see it of n_i A_ik; 1 = uniform), on BOS and on key 0. Mean over "
        f"seeds with 95% t-intervals. At k = {k}: " + "; ".join(said) + ".",
        "",
        *table(["", *variants], rows),
    ]


def routes(study: Study, out: Path) -> list[str]:
    return intervention_routes(study, study_variants(study))


def claim_b(study: Study, out: Path) -> list[str]:
    k = study.opts.early_queries
    variants = study_variants(study)
    rows = [
        [
            f"{PASSES[how].label.format(kind=kind)}, {label}",
            *(share_cell(study.runs_of(v), kind, part, how) for v in variants),
        ]
        for kind, how in swap_passes(study.opts)
        for part, label in PARTS_V4
    ]
    cells = []
    control = removed_by_seed(study.runs_of(study.control), "mean", "content")[0]
    for v in sorted(in_families(study), key=lambda v: v != study.reference):  # reference first
        if v != study.control and control:
            values = removed_by_seed(study.runs_of(v), "mean", "content")[0]
            cells.append((f"`{v}` − `{study.control}`, BOS → mean, content keys", values, control))
    primary = bool(cells) and cells[0][0].startswith(f"`{study.reference}`")
    family = Verdicts(cells, primary=primary)
    question = "(b) How much of the residual position component does replacing BOS remove?"
    study.families.append((question, family))
    return [
        f"## {question}",
        "",
        f"The share of the signed split-half signal at queries 1–{k - 1} removed when the BOS "
        "embedding is replaced, from the local fit, summed over layers ≥ 1 and divided once "
        "(layer 0's keys are the embeddings, where a new BOS changes key 0 by construction). "
        "The content part comes from a fit on the keys j ≥ 1 only (BOS's own logit cannot "
        "leak into it); key 0 is read against that fit. Negative: the replacement adds "
        f"position signal; a seed whose early-query loss rose by more than {BROKEN_NATS:g} nat "
        "is left out (model broken, counted). "
        + family_sentence(study.opts)
        + signal_over_floor(study, study.reference),
        "",
        *table(["", *variants], [*intact_signal_rows(study, variants), *rows]),
        "",
        f"Against the learned-sink-logit control `{study.control}` (attention can park "
        f"without key 0): `{study.reference}`'s cell is the primary one, tested first at 0.05; "
        "the others form a Holm family tested only when it is a finding:",
        "",
        *family.table(f"`{study.control}`"),
        *forest_figure(family, out, "verdict_b", "removed share, content keys − control", question),
    ]


def claim_a(study: Study, out: Path) -> list[str]:
    cfg = RunDir(study.runs_of(study.reference)[0]["run"]).read_config()[0]
    window = study.window
    if not window:
        return ["## (a) Window against RoPE", "", "No window variant in this sweep."]
    T = cfg.data.seq_len
    signed = headline("c_res_window_signed_mean")  # signed C²: what the seeds are tested on
    ref = per_seed(study.runs_of(study.reference), signed)
    cells = [
        (f"`{v}` − `{study.reference}`", per_seed(study.runs_of(v), signed), ref)
        for v in (study.window_variant, study.ntk)
        if v in study.summaries
    ]
    layers = cfg.model.get("n_layer")
    family, question = Verdicts(cells), "(a) Does a window feed the residual position component?"
    study.families.append((question, family))
    return [
        f"## {question}",
        "",
        f"The residual component at queries {window}–{T - 1}, where the window of {window} keys "
        "binds, on the window's pairs in every model (a two-way fit on that pair set), pooled "
        "over heads and averaged over layers ≥ 1, as a signed C² (the seeds are compared on it; "
        "its floor is the 95% quantile of both halves' sign flips, squared); paired by seed. "
        f"With {layers} layers there is "
        f"{'one layer' if layers == 2 else f'{layers - 1} layers'} beyond the first, so this is "
        "the level at depth, not a slope over depth." + _ntk_note(study, T),
        "",
        *table(
            ["variant", f"C² at i ≥ {window}, layers ≥ 1 (signed)", "its no-signal floor"],
            [
                [v, level(per_seed(study.runs_of(v), signed)), level(window_floor(study, v))]
                for v in study_variants(study)
            ],
        ),
        "",
        *family.table(f"`{study.reference}`"),
        *forest_figure(
            family, out, "verdict_a", f"signed C² at i ≥ {window} − reference", question
        ),
    ]


def window_floor(study: Study, variant: str) -> dict:
    """{seed: the no-signal floor of the window contrast, as a C²}."""
    floor = headline("c_res_window_floor")
    return {
        seed: None if value is None else value**2
        for seed, value in per_seed(study.runs_of(variant), floor).items()
    }


def _ntk_note(study: Study, T: int) -> str:
    """How many rotary pairs the trained NTK scale moves past one turn within T."""
    runs = study.runs_of(study.ntk)
    if not runs:
        return ""
    m = RunDir(runs[0]["run"]).model_config()
    d_head = m.d_head
    base, scale = m.params.get("base", 10000.0), m.params.get("scale", 1.0)
    before = turning_pairs(base, d_head, T)
    after = turning_pairs(ntk_base(base, scale, d_head), d_head, T)
    return (
        f" NTK's trained s = {scale:g} leaves {after} of {d_head // 2} rotary pairs turning "
        f"at least once within {T} positions, against {before} for plain RoPE: it moves "
        f"{before - after} pair{'s' if before - after != 1 else ''}."
    )


def emergence(study: Study, out: Path) -> list[str]:
    """The first EMERGENCE_SEEDS seeds of rope at every kept checkpoint."""
    series = (
        ("λ₀ (strongest head)", lambda s, m: results.value(s, "lift0_max")),
        ("α₀ (strongest head)", lambda s, m: results.value(s, "alpha0_max")),
        ("copy loss", lambda s, m: m.get("val_copy_loss")),
        ("value drain (smallest head)", lambda s, m: results.value(s, "value_drain_min")),
        ("massive activation (largest)", lambda s, m: results.value(s, "massive_ratio_max")),
        (
            "BOS → mean removed, content keys",
            lambda s, m: results.value(s, "bos_swap_removed_share", swap="mean", part="content"),
        ),
    )
    curves: dict = {label: [] for label, _ in series}
    rows, sinks_by_seed = [], {}
    shown = emergence_seed(study.runs_of(study.reference)[:EMERGENCE_SEEDS])
    study.prefetch(
        [
            (summary, f"analysis-step{step}", study.at_step(summary, step))
            for summary in study.runs_of(study.reference)[:EMERGENCE_SEEDS]
            for step in map(checkpoint.step_of, RunDir(summary["run"]).checkpoints())
            if step != summary["step"]
        ]
    )
    for summary in study.runs_of(study.reference)[:EMERGENCE_SEEDS]:
        sinks_by_seed[summary["seed"]] = {}
        run = RunDir(summary["run"])
        metrics = {r["step"]: r for r in _evaluations(run)}
        per_step: dict = {label: {} for label, _ in series}
        for path in run.checkpoints():
            step = checkpoint.step_of(path)
            if step == summary["step"]:
                at = summary
            else:
                at = study.extra(summary, f"analysis-step{step}", study.at_step(summary, step))
            m = metrics.get(step, {})
            sinks_by_seed[summary["seed"]][step] = has_sink(at)
            for label, f in series:
                per_step[label][step] = f(at, m)
            if summary["seed"] == shown["seed"]:
                rows.append([str(step), *(number(f(at, m), 3) for _, f in series)])
        for label in curves:
            curves[label].append({s: v for s, v in per_step[label].items() if v is not None})
    fig = plots.seed_curves(
        out / "sink_emergence",
        curves,
        "training step",
        "value",
        f"{study.reference} over training (mean over {len(curves[series[0][0]])} seeds, 95% "
        "t-interval)",
    )
    why = (
        "the first of them to end with a sink"
        if has_sink(shown)
        else f"none of the first {EMERGENCE_SEEDS} ended with a sink"
    )
    return [
        "## Sink emergence over training",
        "",
        f"`{study.reference}`, seed {shown['seed']} ({why}), at every kept checkpoint (the figure "
        f"shows the first {EMERGENCE_SEEDS} seeds; step 0 is there when the runs kept it: "
        "`train.ckpt_initial`). " + persistence(sinks_by_seed),
        "",
        *table(["step", *(label for label, _ in series)], rows),
        "",
        f"![emergence]({fig})",
    ]


def persistence(sinks_by_seed: dict[int, dict[int, float]]) -> str:
    """Whether a sink, once formed, stays: per seed, the kept checkpoints with a sink from the
    first that has one on (the final-step count is a snapshot of a possibly flickering head)."""
    parts = []
    for seed, by_step in sinks_by_seed.items():
        steps = sorted(by_step)
        first = next((s for s in steps if by_step[s]), None)
        if first is None:
            parts.append(f"seed {seed} has none at any checkpoint")
            continue
        after = [by_step[s] for s in steps if s >= first]
        parts.append(
            f"seed {seed} has one at {int(sum(after))} of the {len(after)} checkpoints from "
            f"step {first} on"
        )
    return "From its first checkpoint with a sink: " + "; ".join(parts) + "."


def emergence_seed(summaries: list[dict]) -> dict:
    """The run whose checkpoints the emergence table lists: the first (by seed) that ends with
    a sink, else the first; a table of a seed that never formed one shows no emergence."""
    return next((s for s in summaries if has_sink(s)), summaries[0])


def _evaluations(run: RunDir) -> list[dict]:
    """The run's evaluation records (metrics.jsonl through its owner, damaged lines named)."""
    records = [json.loads(line) for line in run.metrics_lines(up_to_step=math.inf)]
    return [r for r in records if "val_loss" in r]


def in_families(study: Study) -> list[str]:
    """The variants of the (b) and (c) families: all but those whose attention need not sink
    (the [study] role `need_not_sink`), which answer a family of their own."""
    return [v for v in study_variants(study) if v not in (study.roles.get("need_not_sink") or [])]


def need_not_sink(study: Study, out: Path) -> list[str]:
    """Attention that need not sink (softpick, a gated output) against RoPE: does it sink
    less (λ₀ of the strongest head), and does it lean on key 0 less than a random key?"""
    variants = [v for v in study.roles.get("need_not_sink") or [] if v in study.summaries]
    if not variants:
        return []
    lift, excess = headline("lift0_max"), headline("knockout_loss_change", key=EXCESS, heads="all")
    reference = per_seed(study.runs_of(study.reference), lift)
    cells = []
    for v in variants:
        cells.append((f"`{v}` − `{study.reference}`: λ₀, strongest head",
                      per_seed(study.runs_of(v), lift), reference))  # fmt: skip
        leaning = per_seed(study.runs_of(v), excess)
        cells.append((f"`{v}`: key 0 minus random-key control, every head", leaning,
                      zeros(leaning)))  # fmt: skip
    family = Verdicts(cells)
    question = "Does attention that need not sink avoid the sink, and lean on key 0 less?"
    study.families.append((question, family))
    rows = [
        [
            v,
            f"{sum(has_sink(s) for s in study.runs_of(v)):.0f} of {len(study.runs_of(v))}",
            level(per_seed(study.runs_of(v), lift)),
            level(by_records(study, v, virtual_mass)),
        ]
        for v in [study.reference, *variants]
    ]
    return [
        f"## {question}",
        "",
        "Softpick (weights ReLU(eˣ − 1) / Σ|eˣ − 1|, which need not sum to 1) and a head-wise "
        "sigmoid gate on the attention output (Qiu et al. 2025) give a head a way to write "
        "nothing without parking on key 0. One family of its own, fixed in the sweep file, "
        "outside the (b) and (c) families above; 'mass on no key' is softpick's unspent weight.",
        "",
        *table(["variant", "seeds with a sink", "λ₀, strongest head", "mass on no key"], rows),
        "",
        *family.table(f"`{study.reference}` / 0"),
        *forest_figure(family, out, "verdict_need_not_sink", None, question),
    ]


def study_variants(study: Study) -> list[str]:
    order = [study.reference, study.nobos, study.control, study.window_variant, study.ntk]
    return [v for v in order if v in study.summaries] + sorted(
        v for v in study.summaries if v not in order
    )


def header(study: Study, out: Path) -> list[str]:
    finished = sum(len(v) for v in study.summaries.values())
    first = RunDir(study.runs_of(study_variants(study)[0])[0]["run"]).read_config()[0]
    m, t = first.model, first.train
    return [
        "# The sink study: Bigram-Backcopy on a CPU",
        "",
        f"Generated by `posleak study` (sweep `{study.sweep_dir.name}`, {study.seqs} held-out "
        f"sequences per analysis) from the records of {finished} finished runs (of "
        f"{study.planned} planned) in {len(study.summaries)} variants; definitions version "
        f"{DEFINITIONS} ({compare.definitions_link(out)}). Made by "
        f"{provenance.line(provenance.provenance())} Every run: {m['n_layer']} layers of "
        f"{m['n_head']} head{'s' if m['n_head'] > 1 else ''}, d_model {m['d_model']}, context "
        f"{first.data.seq_len}, batch {t.batch_size}, {t.steps} steps at lr {t.lr:g}. Each "
        "verdict table is one Holm family of paired t-tests; **finding** marks a Holm p < 0.05 "
        "with at least 3 seeds; a null names its minimum detectable effect (MDE, 80% power).",
    ]


SECTIONS = (training, claim_c, need_not_sink, anchoring, routes, claim_b, claim_a, emergence)


def write_report(study: Study, out: Path) -> Path:
    return write_sections(study, out, header, SECTIONS)
