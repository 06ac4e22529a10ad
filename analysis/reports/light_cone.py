"""`posleak study SWEEP_DIR --report light-cone`: claim (a) from the light-cone sweep
(configs/sweeps/light_cone.toml), asked as three questions of the band measurements
(analysis/stages/bands.py), each at step 0 and trained, paired by seed.

Every run is analysed twice with the probe and band stages only (trained, in RUN/light-cone;
at initialisation, in RUN/light-cone-step0), full-attention runs in the bands of the
windowed runs' w; plain full-attention RoPE runs also at 4x their training length with NTK at
inference (RUN/light-cone-4x-sS). Each verdict table is one family fixed here, before the data:
its first cell is the primary contrast, tested alone, the rest a Holm family behind it.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from posleak.analysis.engine import provenance
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.options import Options
from posleak.analysis.maths.measures import DEFINITIONS
from posleak.analysis.maths.seeds import mean_interval, paired_difference
from posleak.analysis.reports import compare, plots, results
from posleak.analysis.reports.study import Roles, SweepStudy, loss_curves, write_sections
from posleak.analysis.reports.verdicts import Verdicts, forest_figure
from posleak.analysis.stages.bands import cone_band
from posleak.model.rope import ntk_base, turning_pairs
from posleak.report import number, table
from posleak.train.rundir import RunDir

STAGES = ("probe", "bands")  # what the report reads
NTK_SCALES = (1.0, 2.0, 4.0, 8.0)  # at inference, at 4x the training length (1: the base)
TRAINED, STEP0 = "light-cone", "light-cone-step0"
BEYOND = "band_c_res_content_beyond"  # signed C², layers >= 1: what the seeds are tested on


@dataclasses.dataclass(frozen=True)
class Run:
    path: Path
    variant: str
    seed: int
    position: str
    window: int | None
    seq_len: int
    train_seconds: float


class LightCone(SweepStudy):
    """The finished runs of a light-cone sweep and their analyses, made where missing. Its
    families come from the sweep's [study] table: `window_pairs` (window, full attention)
    and `ntk_pairs` (NTK, plain RoPE), the primary pair first."""

    def __init__(self, sweep_dir: Path, seqs: int, jobs: int = 1, roles: Roles | None = None):
        super().__init__(sweep_dir, seqs, jobs, roles)
        if self.window is None:
            raise ValueError(
                f"{sweep_dir} has no windowed runs sharing one window: the light-cone report "
                "needs them (configs/sweeps/light_cone.toml)"
            )
        self.pairs = [tuple(p) for p in self.roles["window_pairs"]]
        self.ntk_pairs = [tuple(p) for p in self.roles.get("ntk_pairs") or []]
        self.runs = [describe(p) for p in self.paths]
        self.config = RunDir(self.paths[0]).read_config()[0]
        wanted = [(run.path, opts, run.path / name) for run in self.runs
                  for name, opts in self.analyses(run)]  # fmt: skip
        self.make(wanted, "light cone")
        self.summaries = {
            (run.variant, run.seed, name): AnalysisDir(run.path / name).read_summary()
            for run in self.runs
            for name, _ in self.analyses(run)
        }

    def analyses(self, run: Run) -> list[tuple[str, Options]]:
        base = Options(seqs=self.seqs, contrast_window=self.window, stages=STAGES)
        out = [(TRAINED, base), (STEP0, dataclasses.replace(base, step=0))]
        if run.position == "rope" and run.window is None:  # plain RoPE, full attention
            for s in NTK_SCALES:
                scale = None if s == 1 else s
                opts = dataclasses.replace(base, seq_len=4 * run.seq_len, rope_scale=scale)
                out.append((ntk_name(s), opts))
        return out

    @property
    def variants(self) -> list[str]:
        """Every variant, grouped by its name's last part (`-doc`, `-rand`) in the order the
        pairs give, then by name."""
        suffixes = list(dict.fromkeys(v.rsplit("-", 1)[-1] for p in self.pairs for v in p))

        def order(variant: str) -> tuple:
            suffix = variant.rsplit("-", 1)[-1]
            return (suffixes.index(suffix) if suffix in suffixes else len(suffixes), variant)

        return sorted({r.variant for r in self.runs}, key=order)

    def at_four_times(self, variant: str) -> bool:
        """Whether the variant is plain full-attention RoPE: the runs analysed at 4x T."""
        return any(r.position == "rope" and r.window is None for r in self.runs
                   if r.variant == variant)  # fmt: skip

    def per_seed(self, variant: str, name: str, number_name: str) -> dict:
        """{seed: one declared number} of a variant's analyses called `name`."""
        return {
            seed: results.value(summary, number_name)
            for (v, seed, n), summary in self.summaries.items()
            if v == variant and n == name
        }

    def records(self, variant: str, name: str) -> list[list[dict]]:
        return [
            AnalysisDir(r.path / name).read_records()
            for r in sorted(self.runs, key=lambda r: r.seed)
            if r.variant == variant
        ]


def ntk_name(scale: float) -> str:
    return f"light-cone-4x-s{scale:g}"


def describe(path: Path) -> Run:
    cfg, _ = RunDir(path).read_config()
    label = RunDir(path).sweep_label()
    model = cfg.model
    window = model.get("window") or None
    return Run(
        path,
        label.get("variant", path.name),
        label.get("seed", cfg.seed),
        model.get("position", "rope"),
        window,
        cfg.data.seq_len,
        RunDir(path).summary().get("elapsed_s", float("nan")),
    )


# ---------------------------------------------------------------- the report


def header(study: LightCone, out: Path) -> list[str]:
    m, t, w = study.config.model, study.config.train, study.window
    T = study.config.data.seq_len
    L = m["n_layer"]
    d_head = m["d_model"] // m["n_head"]
    rotary = [r for r in study.runs if r.position in ("rope", "rope_ntk")]
    base = RunDir(rotary[0].path).model_config().params["base"] if rotary else 10000.0
    ntk_runs = [r for r in study.runs if r.position == "rope_ntk"]
    ntk_line = ""
    if ntk_runs:
        scale = RunDir(ntk_runs[0].path).model_config().params["scale"]
        before = turning_pairs(base, d_head, T)
        after = turning_pairs(ntk_base(base, scale, d_head), d_head, T)
        ntk_line = (
            f" NTK is trained at s = {scale:g}: of the {d_head // 2} rotary pairs of a head, "
            f"{before} complete a turn within {T} positions at base {base:g} and {after} at "
            f"NTK's base {ntk_base(base, scale, d_head):.4g}, so it moves {before - after}."
        )
    return [
        "# The light-cone study: claim (a) where it can show",
        "",
        f"Generated by `posleak study --report light-cone` (sweep `{study.sweep_dir.name}`, "
        f"{study.seqs} held-out sequences per analysis) from {len(study.runs)} finished runs "
        f"(of {study.planned} planned) in {len(study.variants)} variants; definitions version "
        f"{DEFINITIONS} ({compare.definitions_link(out)}). Made by "
        f"{provenance.line(provenance.provenance())}",
        "",
        f"Every run: {L} layers of {m['n_head']} heads (d_head {d_head}), d_model "
        f"{m['d_model']}, context {T}, RoPE base {base:g}, batch {t.batch_size}, {t.steps} "
        f"steps at lr {t.lr:g}. The window is {w} keys, so the stream entering layer l can "
        f"carry position at query i only if i ≤ l·{w - 1}: the deepest cone (site {L}) ends at "
        f"query {L * (w - 1)} (band {cone_band(L, w, 'resid')} of bands of {w}), and queries "
        f"{L * (w - 1) + 1}–{T - 1} are a region no cone reaches.{ntk_line} Variants ending "
        "`-doc` train on crops that start at a chapter's start (position is in the text: "
        "verse numbers, headings), `-rand` on random crops (no position in the text: the "
        "control).",
        "",
        "Each verdict table is one family fixed before the data: its first cell (the primary "
        "contrast) is tested alone at 0.05 and the others, a Holm family, only when it is a "
        "finding; **finding** needs at least 3 seeds; every null names its minimum detectable "
        "effect (MDE, 80% power) at the level that decides it; below 6 seeds the exact "
        "sign-flip p stands beside the t-test's.",
    ]


def training(study: LightCone, out: Path) -> list[str]:
    rows = []
    runs = {
        v: [RunDir(r.path) for r in sorted(study.runs, key=lambda r: r.seed) if r.variant == v]
        for v in study.variants
    }
    for v in study.variants:
        mine = [r for r in study.runs if r.variant == v]
        loss = mean_interval(study.per_seed(v, TRAINED, "val_loss").values())
        seconds = statistics.mean(r.train_seconds for r in mine)
        analysis = statistics.mean(
            study.summaries[(v, r.seed, name)]["seconds"] for r in mine for name in (TRAINED, STEP0)
        )
        rows.append([v, len(mine), interval(loss, 4), f"{seconds:.0f}", f"{analysis:.0f}"])
    return [
        "## Runs and costs",
        "",
        "Seconds on this machine, one thread per run, two runs at a time (analyses of the "
        "probe and band stages only).",
        "",
        *table(
            ["variant", "seeds", "validation loss (nats)", "training s / run", "analysis s"],
            rows,
        ),
        "",
        f"![validation loss]({loss_curves(out, runs)})",
    ]


def figures(study: LightCone, out: Path) -> list[str]:
    lines = ["## Position by query band and layer", ""]
    for name, title in ((STEP0, "step 0"), (TRAINED, "trained")):
        groups = {v: study.records(v, name) for v in study.variants}
        png = plots.band_maps(out / f"light_cone_{title.replace(' ', '')}", groups, cone_band)
        lines += [f"![{title}]({Path(png).name})", ""]
    lines.append(
        f"Top of each pair: the band probe's held-out R² (x_i → i within a band of {study.window} "
        "queries) by residual site; bottom: the share of seeds whose band C_content_res (version "
        "4's content part on the window's pairs) exceeds its family-wise floor, by attention "
        "layer. Dashed: the last band the window's cone reaches (under full attention, for "
        "reference only)."
    )
    return lines


def frontier_growth(study: LightCone, out: Path) -> list[str]:
    w, L = study.window, study.config.model["n_layer"]
    windowed = [a for a, _ in study.pairs if a in study.variants]  # the primary first
    slope = "band_frontier_slope"
    rows = []
    for v in study.variants:
        s0, s1 = study.per_seed(v, STEP0, slope), study.per_seed(v, TRAINED, slope)
        rows.append(
            [
                v,
                level(study, v, STEP0, slope),
                level(study, v, TRAINED, slope),
                difference(paired_difference(s1, s0)),
                beyond_cone(study, v, STEP0) if v in windowed else "(no cone)",
                beyond_cone(study, v, TRAINED) if v in windowed else "(no cone)",
            ]
        )
    family = Verdicts(
        [
            (f"`{v}` trained", (s := study.per_seed(v, TRAINED, slope)), zeros_of(s))
            for v in windowed
        ],
        primary=True,
    )
    cone = (w - 1) / w
    lines = [
        "## 1. Does a window's band frontier grow with depth?",
        "",
        f"The frontier of a residual site is its last band (of {w} queries) whose probe reads "
        "above the floor (family-wise over the site's bands); its slope over sites 1–"
        f"{L} is in bands per layer. The cone allows {cone:.3g} bands per layer "
        f"({w - 1} queries a layer). 'Beyond the cone': sites whose frontier lies past the "
        "cone's last band, of all sites, over seeds: nothing but noise can put it there.",
        "",
        *table(
            [
                "variant",
                "slope, step 0",
                "slope, trained",
                "trained − step 0 (paired)",
                "beyond the cone, step 0",
                "beyond the cone, trained",
            ],
            rows,
        ),
        "",
        "Trained window models, slope against 0:",
        "",
        *family.table("0"),
        *forest_figure(
            family,
            out,
            "verdict_frontier",
            "frontier slope (bands per layer) − 0",
            "1. Frontier slope of trained window models",
        ),
        "",
    ]
    study.families.append(("1. Does a window's band frontier grow with depth?", family))
    lines += [f"- `{v}`, trained: {family.words(f'`{v}` trained')}." for v in windowed]
    step0 = {v: mean_interval(study.per_seed(v, STEP0, slope).values()) for v in windowed}
    climbing = [v for v, m in step0.items() if m and m[3] >= 2 and m[1] > 0]
    lines += [
        f"- At step 0 (the architecture alone) the frontier climbs in {len(climbing)} of "
        f"{len(windowed)} window variants (95% t-interval above 0): "
        + (", ".join(f"`{v}` {interval(step0[v])}" for v in climbing) or "none")
        + f", against the cone's {cone:.3g}; full attention at step 0: "
        + ", ".join(
            f"`{f}` {level(study, f, STEP0, slope)}"
            for f in dict.fromkeys(f for _, f in study.pairs)
            if f in study.variants and study.at_four_times(f)
        )
        + "."
    ]
    for v in windowed:
        beyond = beyond_cone(study, v, TRAINED)
        tokens = mean_interval(study.per_seed(v, TRAINED, "band_probe_r2_beyond_embed").values())
        if tokens and tokens[3] >= 2 and tokens[1] > 0:
            lines.append(
                f"- `{v}`: the embeddings alone decode position at queries i ≥ {w} (band "
                f"probe R² {interval(tokens)}): the text carries it, so no cone bounds it "
                f"({beyond} sites trained have their frontier past the cone)."
            )
    return lines


def window_against_full(study: LightCone, out: Path) -> list[str]:
    w = study.window
    cells, beside = [], []
    for a, b in study.pairs:  # the primary contrast first
        if a in study.variants and b in study.variants:
            add_contrast(study, a, b, cells, beside)
    family = Verdicts(cells, primary=True)
    probe_rows = [
        [
            v,
            level(study, v, TRAINED, "band_probe_r2_beyond_embed"),
            level(study, v, STEP0, "band_probe_r2_beyond_last"),
            level(study, v, TRAINED, "band_probe_r2_beyond_last"),
        ]
        for v in study.variants
    ]
    lines = [
        f"## 2. Is the window's residual part beyond w = {w} larger than full attention's?",
        "",
        f"Version 4's content part (keys j ≥ 1, key 0 out of the fit) at every query i ≥ {w} on "
        f"the window's pairs (i − j < {w}) in both models, signed C², heads pooled, mean over "
        "layers ≥ 1; paired by seed. Beside each trained contrast: the same contrast at step "
        "0 and what training added to it (trained − step 0, paired), both descriptive.",
        "",
        *verdict_block(family, "the full-attention model", cells, beside),
        *forest_figure(
            family,
            out,
            "verdict_window",
            f"signed C² at i ≥ {w}, window − full",
            "2. Residual part beyond w: window − full attention",
        ),
    ]
    question = f"2. Is the window's residual part beyond w = {w} larger than full attention's?"
    study.families.append((question, family))
    lines += [
        "",
        f"Position decodable at queries i ≥ {w} (band probe R², mean over those bands), mean "
        "[95% t-interval] over seeds: the embeddings (what the tokens alone say), and the last "
        "residual site at step 0 and trained.",
        "",
        *table(
            ["variant", "embeddings, trained", "last site, step 0", "last site, trained"],
            probe_rows,
        ),
    ]
    return lines


def ntk(study: LightCone, out: Path) -> list[str]:
    cells, beside = [], []
    for a, b in study.ntk_pairs:
        if a in study.variants and b in study.variants:
            add_contrast(study, a, b, cells, beside)
    top = max(NTK_SCALES)
    for v in dict.fromkeys(b for _, b in study.ntk_pairs):
        if v in study.variants and study.at_four_times(v):
            cells.append(
                (
                    f"`{v}` at 4T, s = {top:g} − s = 1",
                    study.per_seed(v, ntk_name(top), BEYOND),
                    study.per_seed(v, ntk_name(1.0), BEYOND),
                )
            )
            beside.append(["(one checkpoint)", "(inference only)"])
    family = Verdicts(cells, primary=True)
    T4 = 4 * study.config.data.seq_len
    scale_rows = [
        [v, *(level(study, v, ntk_name(s), BEYOND) for s in NTK_SCALES)]
        for v in study.variants
        if study.at_four_times(v)
    ]
    lines = [
        "## 3. Does NTK suppress the residual part?",
        "",
        "Trained with NTK against plain RoPE (the same base), and NTK applied at inference to "
        f"the trained RoPE models at 4× their context ({T4} positions; the same sequences at "
        "every s), on the same signed C² as question 2.",
        "",
        *verdict_block(family, "the reference", cells, beside),
        *forest_figure(
            family,
            out,
            "verdict_ntk",
            f"signed C² at i ≥ {study.window}, difference",
            "3. NTK against plain RoPE",
        ),
    ]
    study.families.append(("3. Does NTK suppress the residual part?", family))
    lines += [
        "",
        f"At inference, {T4} positions, signed C² at i ≥ {study.window} by NTK scale (mean "
        "[95% t-interval] over seeds):",
        "",
        *table(["variant", *(f"s = {s:g}" for s in NTK_SCALES)], scale_rows),
    ]
    return lines


# ---------------------------------------------------------------- helpers
def windowed_variant(study: LightCone, variant: str) -> bool:
    return any(r.window for r in study.runs if r.variant == variant)


def add_contrast(study: LightCone, a: str, b: str, cells: list, beside: list) -> None:
    """The trained contrast a − b on BEYOND as a family cell, its step-0 row beside it."""
    cells.append(
        (f"`{a}` − `{b}`", study.per_seed(a, TRAINED, BEYOND), study.per_seed(b, TRAINED, BEYOND))
    )
    beside.append(step0_and_learned(study, a, b, BEYOND))


def step0_and_learned(study: LightCone, a: str, b: str, name: str) -> list[str]:
    """The contrast a − b at step 0, and trained − step 0 of it, both paired by seed."""
    s0, s1 = (contrast(study, a, b, step, name) for step in (STEP0, TRAINED))
    return [difference(paired_difference(s0, zeros_of(s0))), difference(paired_difference(s1, s0))]


def contrast(study: LightCone, a: str, b: str, analysis: str, name: str) -> dict:
    """{seed: a − b} of one number over the seeds both variants have."""
    x, y = study.per_seed(a, analysis, name), study.per_seed(b, analysis, name)
    return {s: x[s] - y[s] for s in x.keys() & y.keys() if x[s] is not None and y[s] is not None}


def zeros_of(values: dict) -> dict:
    return dict.fromkeys(values, 0.0)


def beyond_cone(study: LightCone, variant: str, name: str) -> str:
    """Sites whose band probe frontier lies past the cone's last band, over seeds."""
    w, past, total = study.window, 0, 0
    for rows in study.records(variant, name):
        for r in rows:
            if r["metric"] == "band_frontier":
                total += 1
                past += r["value"] > cone_band(r["layer"], w, "resid")
    return f"{past} of {total}"


def level(study: LightCone, variant: str, analysis: str, name: str) -> str:
    """A number's mean over seeds with its 95% t-interval."""
    return interval(mean_interval(study.per_seed(variant, analysis, name).values()))


def verdict_block(family: Verdicts, against: str, cells: list, beside: list) -> list[str]:
    """A family's verdict table, the step-0 and learned table beside it, and its words."""
    rows = [[label, *more] for (label, _, _), more in zip(cells, beside, strict=True)]
    return [
        *family.table(against),
        "",
        *table(["contrast", "at step 0", "learned (trained − step 0)"], rows),
        "",
        *(f"- {label}: {family.words(label)}." for label, _, _ in cells),
    ]


def interval(found, digits: int = 3) -> str:
    if found is None:
        return "–"
    mean, lo, hi, n = found
    if n < 2:
        return f"{number(mean, digits)} (n=1)"
    return f"{number(mean, digits)} [{number(lo, digits)}, {number(hi, digits)}]"


def difference(d) -> str:
    return "–" if d is None else interval((d.mean, d.lo, d.hi, d.n))


SECTIONS = (training, figures, frontier_growth, window_against_full, ntk)


def write_report(study: LightCone, out: Path) -> Path:
    return write_sections(study, out, header, SECTIONS)
