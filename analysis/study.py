"""`posleak study SWEEP_DIR [--out DIR] [--seqs N]`: the study's report (default runs/study).

Reads the finished runs of a study sweep (configs/sweeps/study.toml or study-small.toml),
analyses any that are not yet analysed, adds the study's own analyses (the reference
variant's runs at 4x their training length with and without NTK scaling at inference, and
its first seed at every kept checkpoint), and writes report.md, whose every number and
sentence is computed from the records. Claims are paired by seed against `rope` (and against
the `sink` control for BOS replacement); a difference is a finding only when its 95%
t-interval excludes zero with at least 3 seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from posleak.analysis import compare, plots
from posleak.analysis.analyze import analyze
from posleak.analysis.folder import AnalysisDir
from posleak.analysis.measures import DEFINITIONS
from posleak.analysis.options import Options
from posleak.data import make_source
from posleak.files import atomic_write, safe_dir
from posleak.log import log
from posleak.report import MIN_SEEDS, mean_interval, number, paired_difference, table
from posleak.train import checkpoint
from posleak.train.rundir import RunDir

REFERENCE, CONTROL, WINDOWED, NTK = "rope", "sink", "swa", "ntk"
DEEP = 2  # claim (a) reads layers >= DEEP


def step_series(opts: Options) -> list[tuple[str, str]]:
    """(headline key, label) of the emergence table, labels from the analysis options."""
    k = opts.early_queries
    return [
        ("alpha0_max", "α₀ of the strongest head"),
        ("a0_early_max", f"A_i0 at i < {k}, strongest early reader"),
        (f"bos_swap_removed_mean_k{k}", f"C_res² removed by BOS→mean, i < {k}"),
        ("probe_r2_log_last", "probe R², log target (last layer)"),
        ("c_res_early", f"C_res at queries 1–{k - 1}"),
    ]


class Study:
    """The runs of one study sweep, grouped by variant, with their analysis summaries."""

    def __init__(self, sweep_dir: Path, seqs: int):
        self.sweep_dir, self.seqs = Path(sweep_dir), seqs
        runs = compare.find_runs([str(sweep_dir)])
        groups, self.summaries = compare.load_groups(runs, Options(seqs=seqs))
        if not self.summaries:
            raise FileNotFoundError(f"{sweep_dir} holds no finished runs yet")
        self.groups = groups
        self.opts = Options.of_summary(next(iter(self.summaries.values()))[0])
        self.text = [v for v, s in self.summaries.items() if s[0]["data"] != "markov"]
        self.markov = [v for v in self.summaries if v not in self.text]

    def runs_of(self, variant: str) -> list[dict]:
        return sorted(self.summaries.get(variant, []), key=lambda s: s["seed"])

    def extra(self, summary: dict, name: str, opts: Options) -> dict:
        """An additional analysis of one run, kept in RUN/name and reused when current."""
        folder = AnalysisDir(Path(summary["run"]) / name)
        if folder.summary_file.exists() and folder.read_summary().get("definitions") == DEFINITIONS:
            return folder.read_summary()
        log.info(f"[study] {summary['run']}: {name}")
        return analyze(summary["run"], opts, folder.path)


# ---------------------------------------------------------------- numbers per run
def deep_c_res(summary: dict) -> float | None:
    """C_res at early queries averaged over layers >= DEEP (claim a)."""
    values = [v for l, v in summary["per_layer"]["c_res_early"].items() if int(l) >= DEEP]
    return sum(values) / len(values) if values else None


def depth_slope(summary: dict) -> float | None:
    """Least-squares slope of early C_res against layer: growth with depth."""
    points = [(int(l), v) for l, v in summary["per_layer"]["c_res_early"].items()]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def fingerprint_bos_max(summary: dict) -> float | None:
    """Largest dispersion of the position-0 output across inputs sharing BOS (0 = identical)."""
    values = summary["per_layer"]["fingerprint_dispersion_bos"].values()
    return max(values, default=None)


def per_seed(summaries: list[dict], number) -> dict:
    return {s["seed"]: number(s) for s in summaries}


def headline(key: str):
    return lambda s: s["headline"].get(key)


# ---------------------------------------------------------------- words from numbers
def _fmt(x) -> str:
    return number(x, 3)


def level(values: dict, percent: bool = False) -> str:
    """Mean over seeds with its 95% t-interval, in words for a table cell."""
    found = mean_interval(values.values())
    if found is None:
        return "–"
    m, lo, hi, n = found
    show = (lambda x: f"{x:.0%}") if percent else (lambda x: f"{x:.3g}")
    if n < 2:
        return f"{show(m)} (n=1)"
    return f"{show(m)} [{show(lo)}, {show(hi)}] (n={n})"


def verdict(values: dict, reference: dict) -> str:
    """A paired difference in words: detected, or not detected at this scale."""
    d = paired_difference(values, reference)
    if d is None:
        return "not measured (no shared seeds)"
    if d.n < MIN_SEEDS:
        return f"{_fmt(d.mean)} with n={d.n} < {MIN_SEEDS} seeds: not tested"
    interval = f"{_fmt(d.mean)} [{_fmt(d.lo)}, {_fmt(d.hi)}]"
    if d.finding:
        return f"**{'higher' if d.mean > 0 else 'lower'}**, {interval}"
    return f"not detected at this scale, {interval}"


# ---------------------------------------------------------------- the three claims
def claim_a(study: Study, out: Path) -> list[str]:
    rows, diffs = _claim_a_rows(study)
    curves = {
        v: [_numeric(s["per_layer"]["c_res_early"]) for s in study.runs_of(v)] for v in study.text
    }
    fig = plots.seed_curves(
        out / "claim_a_c_res_by_layer",
        curves,
        "layer",
        f"C_res, queries 1–{study.opts.early_queries - 1}",
        "Residual-stream component at early queries by layer",
    )
    ntk, swa = diffs.get(NTK, ("not run",) * 2), diffs.get(WINDOWED, ("not run",) * 2)
    header = [
        "variant",
        f"C_res, i < {study.opts.early_queries}, layers ≥ {DEEP}",
        "slope per layer",
    ]
    return [
        "## (a) Does the residual-stream component order NTK < RoPE < window at layers ≥ 2?",
        "",
        f"Answer: NTK − RoPE at layers ≥ {DEEP} (the claim: lower): {ntk[0]}. Window − RoPE "
        f"(the claim: higher): {swa[0]}. Growth with depth (least-squares slope of C_res over "
        f"layers), window − RoPE (the claim: higher): {swa[1]}.",
        "",
        *table([*header, "− rope (paired)", "slope − rope (paired)"], rows),
        "",
        f"![C_res by layer]({fig})",
    ]


def _claim_a_rows(study: Study) -> tuple[list[list[str]], dict]:
    """Per text variant: levels of deep C_res and its slope, and both paired against rope."""
    ref = per_seed(study.runs_of(REFERENCE), deep_c_res)
    ref_slope = per_seed(study.runs_of(REFERENCE), depth_slope)
    rows, diffs = [], {}
    for v in study.text:
        deep = per_seed(study.runs_of(v), deep_c_res)
        slope = per_seed(study.runs_of(v), depth_slope)
        if v == REFERENCE:
            paired = ("reference", "reference")
        else:
            paired = diffs[v] = (verdict(deep, ref), verdict(slope, ref_slope))
        rows.append([v, level(deep), level(slope), *paired])
    return rows, diffs


def claim_b(study: Study) -> list[str]:
    def removed(variant: str, kind: str) -> dict:
        key = f"bos_swap_removed_{kind}_k{study.opts.early_queries}"
        return per_seed(study.runs_of(variant), headline(key))

    kinds = study.opts.swaps
    rows = [[v, *(level(removed(v, k), percent=True) for k in kinds)] for v in study.text]
    versus = [
        [v, *(verdict(removed(v, k), removed(CONTROL, k)) for k in kinds)]
        for v in study.text
        if v != CONTROL
    ]
    return [
        "## (b) What share of the residual component at early queries does replacing BOS remove?",
        "",
        f"Share of Σ C_res² over queries 1–{study.opts.early_queries - 1} and all layers removed "
        "when the position-0 "
        "embedding is replaced (negative: the replacement adds position signal). Answer: "
        + _against_source(mean_interval(removed(REFERENCE, "mean").values())),
        "",
        *table(["variant", *(f"BOS→{k}" for k in kinds)], rows),
        "",
        f"Against the learned-sink control (`{CONTROL}`), paired by seed (removed share, as a "
        "fraction):",
        "",
        *table(["variant", *(f"BOS→{k} − {CONTROL}" for k in kinds)], versus),
    ]


def _against_source(found) -> str:
    """RoPE's BOS→mean removed share set against the source study's 40%."""
    if found is None:
        return f"`{REFERENCE}` was not measured."
    m, lo, hi, n = found
    said = f"for RoPE, BOS → frequency-weighted mean embedding removes {m:.0%}"
    if n < 2:
        return said + " (one seed: no interval)."
    span = f"[{lo:.0%}, {hi:.0%}] over {n} seeds"
    zero = "excludes" if lo > 0 or hi < 0 else "includes"
    source = "includes" if lo <= 0.4 <= hi else "excludes"
    return (
        f"{said}, 95% t-interval {span}: the interval {zero} 0 and {source} the source study's 40%."
    )


def claim_c(study: Study) -> list[str]:
    rows, formed = [], []
    for v in study.summaries:
        runs = study.runs_of(v)
        rate = per_seed(runs, headline("sink_rate"))
        if any((r or 0) > 0 for r in rate.values()):
            formed.append(v)
        rows.append(
            [
                v,
                level(per_seed(runs, headline("alpha0_max"))),
                level(rate),
                level(per_seed(runs, fingerprint_bos_max)),
                level(per_seed(runs, headline("fingerprint_nobos_last"))),
            ]
        )
    where = ", ".join(f"`{v}`" for v in formed) if formed else "no variant"
    bos_max = max(
        (fingerprint_bos_max(s) or 0.0 for items in study.summaries.values() for s in items),
        default=0.0,
    )
    return [
        "## (c) Do sink heads form, and is their position-0 output identical across inputs?",
        "",
        f"Answer: sink heads (α₀ > {study.opts.sink_eps:g}) form in {where}. With BOS at "
        "position 0 the "
        f"position-0 output of every head is identical across inputs (largest difference "
        f"{bos_max:.2g} in any run and layer): position 0 sees only itself, so its "
        "trajectory is a deterministic fingerprint of the BOS token, whether or not a head "
        "reads it. Without BOS it varies with the first token.",
        "",
        *table(
            [
                "variant",
                "α₀, strongest head",
                "sink rate",
                "x₀ dispersion with BOS (max)",
                "x₀ dispersion without BOS (last layer)",
            ],
            rows,
        ),
    ]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _numeric(curve: dict) -> dict:
    return {float(k): v for k, v in curve.items() if v is not None}


# ---------------------------------------------------------------- the rest of the picture
def training(study: Study, out: Path) -> list[str]:
    curves, rows = {}, []
    for v in study.summaries:
        runs = [RunDir(s["run"]) for s in study.runs_of(v)]
        curves[v] = [_val_curve(r) for r in runs]
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
    fig = plots.seed_curves(
        out / "val_loss", curves, "step", "validation loss", "Validation loss during training"
    )
    return [
        "## Training: loss curves and the cost of one run",
        "",
        "Wall time is that of one run on one core of a 2-core CPU (two runs at a time, while "
        "other work shared the machine, so an upper bound); a larger study can be planned "
        "from it. For a synthetic corpus, the loss floors are the chain's entropy rate (the "
        "best possible predictor) and its unigram entropy (token frequencies alone), in nats.",
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


def _val_curve(run: RunDir) -> dict:
    records = (json.loads(line) for line in run.metrics_file.read_text().splitlines())
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def position_readout(study: Study, out: Path) -> list[str]:
    text = {v: study.groups[v] for v in study.text}
    markov = {v: study.groups[v] for v in study.markov}
    figs = [plots.figure(out / "probe_text", lambda ax: plots.probe_curve(ax, text))]
    if markov:
        figs.append(plots.figure(out / "probe_markov", lambda ax: plots.probe_curve(ax, markov)))
    numbers = (
        headline("probe_r2_log_last"),
        headline("knockout_probe_r2_log_drop"),
        lambda s: _mean(s["per_layer"]["c_mask"].values()),
        headline("shift_js"),
    )
    rows = [
        [v, *(level(per_seed(study.runs_of(v), number)) for number in numbers)]
        for v in study.summaries
    ]
    header = ["variant", "probe R² (last layer)", "R² lost by key-0 knockout", "C_mask (mean)"]
    return [
        "## Where absolute position becomes decodable, and what key 0 carries",
        "",
        "Held-out R² of a cross-validated ridge probe for log(1 + position) at each residual "
        "site, on text and on the stationary Markov corpus (whose data carry no position).",
        "",
        *(f"![probe]({f})" for f in figs),
        "",
        *table([*header, "shift-test JS"], rows),
    ]


def extrapolation(study: Study, out: Path) -> list[str]:
    text = {v: study.groups[v] for v in study.text}
    fig = plots.figure(out / "extrapolation", lambda ax: plots.extrapolation_curve(ax, text))
    beyond = sorted(
        {k for v in study.text for s in study.runs_of(v) for k in s["headline"]},
        key=lambda k: (len(k), k),
    )
    beyond = [k for k in beyond if k.startswith("loss_beyond_")]
    rows = [
        [v, *(level(per_seed(study.runs_of(v), headline(k))) for k in beyond)] for v in study.text
    ]
    return [
        "## Length extrapolation (loss beyond the training length; `ntkS`: NTK at inference)",
        "",
        *table(["variant", *(k.removeprefix("loss_beyond_") for k in beyond)], rows),
        "",
        f"![extrapolation]({fig})",
    ]


def inference_ntk(study: Study) -> list[str]:
    """The reference runs at 4x their training length, without and with NTK scaling s = 4."""
    rows = []
    for scale in (None, 4.0):
        numbers: dict = {"probe": {}, "c_res": {}}
        for s in study.runs_of(REFERENCE):
            opts = Options(
                seqs=max(8, study.seqs // 4),
                seq_len=4 * s["seq_len"],
                rope_scale=scale,
                swaps=(),
                knockout=False,
                extrapolation=(),
            )
            extra = study.extra(s, "analysis-4x" + (f"-ntk{scale:g}" if scale else ""), opts)
            numbers["probe"][s["seed"]] = extra["headline"]["probe_r2_log_last"]
            numbers["c_res"][s["seed"]] = extra["headline"]["c_res_early"]
        rows.append([f"s = {scale or 1:g}", level(numbers["probe"]), level(numbers["c_res"])])
    return [
        f"## `{REFERENCE}` at 4× its training length, with and without NTK at inference",
        "",
        *table(
            ["inference scale", "probe R² (last layer)", f"C_res, i < {study.opts.early_queries}"],
            rows,
        ),
    ]


def emergence(study: Study, out: Path) -> list[str]:
    """The first seed of the reference variant at every kept checkpoint."""
    first = study.runs_of(REFERENCE)[0]
    steps = [checkpoint.step_of(p) for p in RunDir(first["run"]).checkpoints()]
    by_step = {}
    for step in steps:
        if step == first["step"]:
            by_step[step] = first
        else:
            opts = Options(seqs=study.seqs, step=step)
            by_step[step] = study.extra(first, f"analysis-step{step}", opts)
    series = step_series(study.opts)
    rows = [
        [str(step), *(_fmt(s["headline"].get(k)) for k, _ in series)] for step, s in by_step.items()
    ]
    curves = {
        label: [{step: s["headline"].get(k) for step, s in by_step.items()}]
        for k, label in series[:3]
    }
    fig = plots.seed_curves(
        out / "emergence",
        curves,
        "training step",
        "value",
        f"{REFERENCE}, seed {first['seed']}, over training "
        f"(a sink head: α₀ > {study.opts.sink_eps:g})",
    )
    return [
        f"## Sink emergence over training (`{REFERENCE}`, seed {first['seed']})",
        "",
        *table(["step", *(label for _, label in series)], rows),
        "",
        f"![emergence]({fig})",
    ]


# ---------------------------------------------------------------- the report
def scale_note(study: Study) -> list[str]:
    first = study.runs_of(REFERENCE)[0]
    run = RunDir(first["run"])
    cfg, _ = run.read_config()
    curve = _val_curve(run)
    steps = sorted(curve)
    last_drop = curve[steps[-2]] - curve[steps[-1]] if len(steps) > 1 else None
    minutes = run.summary()["elapsed_s"] / 60
    m = cfg.model
    return [
        "## Scale, and what a larger study needs",
        "",
        f"Every text run: {m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} heads, "
        f"context {cfg.data.seq_len}, batch {cfg.train.batch_size}, {cfg.train.steps} steps "
        f"({cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len / 1e6:.1f}M tokens). "
        f"Validation loss of `{REFERENCE}` seed {first['seed']} fell by {_fmt(last_drop)} over "
        f"its last {steps[-1] - steps[-2] if len(steps) > 1 else 0} steps, so training had "
        f"{'not yet' if (last_drop or 0) > 0.01 else 'nearly'} flattened. One run took "
        f"{minutes:.1f} minutes on one CPU core; the cost grows linearly with steps and seeds. "
        "A null here is 'not detected at this scale', not a failure to reproduce: the source "
        "study's models were pretrained far longer, and sinks in particular are reported to "
        "emerge with training length and data scale.",
    ]


def write_report(study: Study, out: Path) -> Path:
    safe_dir(out, "report folder")
    planned = len(list((study.sweep_dir / "configs").glob("*.toml")))
    finished = sum(len(v) for v in study.summaries.values())
    lines = [
        "# The study: where absolute position comes from, at 6 layers and context 256",
        "",
        f"Generated by `posleak study` (sweep `{study.sweep_dir.name}`, {study.seqs} held-out "
        f"sequences per analysis) from the records of {finished} "
        f"finished runs (of {planned} planned) in {len(study.summaries)} variants; "
        f"definitions version {DEFINITIONS} ({compare.definitions_link(out)}). Differences are "
        f"paired by seed; **higher**/**lower** marks a 95% t-interval that excludes 0 with at "
        f"least {MIN_SEEDS} seeds. Every measurement of every variant, side by side: "
        f"`posleak compare {study.sweep_dir}`.",
        "",
    ]
    with_figures = (claim_a, emergence, position_readout, extrapolation, training)
    for section in (claim_a, claim_b, claim_c, inference_ntk, emergence, *with_figures[2:]):
        lines += [*(section(study, out) if section in with_figures else section(study)), ""]
    lines += scale_note(study)
    report = out / "report.md"
    atomic_write(report, "\n".join(lines))
    return report
