"""`posleak compare RUN_OR_SWEEP_DIR... [--out DIR] [--reference VARIANT]`

Groups runs by variant (from their sweep labels or configs), analyses any finished run that
has not been analysed with the current definitions, and writes a Markdown report with
figures. Variants are compared with the reference variant paired by seed: the mean
difference over shared seeds with a 95% t-interval; the table is one family, and a difference
is marked a finding only when, with at least 3 seeds, its Holm-adjusted p is below 0.05.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from posleak.analysis.engine import provenance
from posleak.analysis.engine.batch import analyse_all
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.options import Options
from posleak.analysis.engine.records import mean_std
from posleak.analysis.engine.reuse import current_in
from posleak.analysis.maths.measures import DEFINITIONS
from posleak.analysis.maths.seeds import MIN_SEEDS, holm, mean_interval, paired_difference
from posleak.analysis.reports import results
from posleak.analysis.reports.html import to_html
from posleak.analysis.reports.verdicts import ALPHA, difference_cell
from posleak.analysis.stages import ENGINE_NUMBERS, STAGES
from posleak.files import atomic_write, owned_dir
from posleak.log import log
from posleak.report import number, table
from posleak.train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


POOLED = ("definitions", "seqs", "seq_len", "data", "bos", "rope_scale")  # within a variant
LABELLED = (
    "early_queries",
    "sink_eps",
    "swaps",
    "early_k",
    "contrast_window",
)  # options the labels are made from
COMPARED = ("definitions", "seqs", *LABELLED)  # across variants (data and length may differ)


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories, folders of runs, and analysis folders (such as `posleak analyze
    hf:MODEL` writes: analysis.json and records.jsonl without a run around them). A run named
    twice (directly and through its sweep, say) counts once."""
    runs: dict[Path, Path] = {}
    for p in map(Path, paths):
        if RunDir(p).config_file.exists() or AnalysisDir.is_analysis(p):
            found = [p]
        else:
            found = sorted(c.parent for c in p.glob("*/config.toml"))
            if not found:
                raise FileNotFoundError(
                    f"{p} is neither a run directory, an analysis folder, nor holds any runs"
                )
        for run in found:
            runs.setdefault(run.resolve(), run)
    return list(runs.values())


def contrast_window_of(runs: list[Path]) -> int | None:
    """The window w of the windowed runs among `runs` when they share one (None otherwise):
    every run is then analysed with it, so that the window contrast reads the same pairs in
    full-attention and windowed models (version 3, item 4)."""
    windows = {
        RunDir(run).read_config()[0].model.get("window") or None  # 0: no window
        for run in runs
        if RunDir(run).config_file.exists()
    } - {None}
    return windows.pop() if len(windows) == 1 else None


def load_groups(
    runs: list[Path], opts: Options, exact: bool = False, jobs: int = 1
) -> tuple[dict, dict]:
    """{variant: [records of each run]} and {variant: [analysis summaries]}. A run without a
    current analysis is analysed with `opts` (`jobs` at a time); with `exact`, so is one
    analysed otherwise."""
    groups: dict = {}
    summaries: dict = {}
    folders, todo = [], []
    for run in runs:
        folder = AnalysisDir(run if AnalysisDir.is_analysis(run) else run / "analysis")
        current = current_in(folder, opts if exact else None)
        if not current and folder.path == run:
            raise ValueError(
                f"{run} was analysed with other definitions or options: analyse its run again"
            )
        if not current and RunDir(run).summary() is None:
            log.warning(f"[compare] skipping {run}: training has not finished")
            continue
        folders.append(folder)
        if not current:
            todo.append((run, opts, None))
    analyse_all(todo, jobs, "compare")
    for folder in folders:
        summary = folder.read_summary()
        groups.setdefault(summary["variant"], []).append(folder.read_records())
        summaries.setdefault(summary["variant"], []).append(summary)
    check_matched(summaries)
    return groups, summaries


def check_matched(summaries: dict) -> None:
    """Refuse to pool (over seeds) or compare analyses made with different options: their
    numbers are not comparable."""
    for items in summaries.values():
        _same(items, POOLED)
    _same([s for items in summaries.values() for s in items], COMPARED)
    check_distinct(summaries)


def check_distinct(summaries: dict) -> None:
    """Refuse one trained model counted twice (a copied run folder would otherwise pool as
    two seeds): runs are told apart by what was trained, their checkpoint's weights digest."""
    seen: dict = {}
    for items in summaries.values():
        for s in items:
            digest = s.get("checkpoint_digest")
            if digest and digest in seen:
                raise ValueError(
                    f"{seen[digest]} and {s['run']} hold the same trained model (checkpoint "
                    f"{digest[:12]}…): a copy would count as two seeds; compare each run once"
                )
            seen.setdefault(digest, s["run"])


def _option(summary: dict, key: str):
    if key in LABELLED:
        return getattr(Options.of_summary(summary), key)
    return summary.get(key)


def _same(items: list[dict], keys) -> None:
    for key in keys:
        values = {json.dumps(_option(s, key)): s.get("run") for s in items}
        if len(values) > 1:
            (a, run_a), (b, run_b) = list(values.items())[:2]
            raise ValueError(
                f"the analyses differ in {key} ({run_a}: {a}, {run_b}: {b}), so their numbers "
                "are not comparable; analyse them again with the same options, or compare "
                "them separately"
            )


def headline_rows(summaries: dict, opts: Options) -> list[tuple[str, str]]:
    """(key, label) of every declared number that some analysis measured."""
    return [
        (key, label)
        for key, label in results.rows(opts)
        if any(s["headline"].get(key) is not None for items in summaries.values() for s in items)
    ]


def by_seed(items: list[dict], key: str) -> dict:
    return {s["seed"]: s["headline"].get(key) for s in items}


def level_table(summaries: dict, rows) -> list[str]:
    """Mean ± sd over seeds per variant, with the 95% t-interval of the mean."""
    variants = list(summaries)
    body = []
    for key, label in rows:
        cells = [label]
        for v in variants:
            vals = [x for x in by_seed(summaries[v], key).values() if x is not None]
            found = mean_interval(vals)
            if found is None or found[3] < 2:
                cells.append(number(found and found[0]))
                continue
            m, lo, hi, _ = found
            sd = number(mean_std(vals)[1], 2)
            cells.append(f"{number(m)} ± {sd} [{number(lo)}, {number(hi)}]")
        body.append(cells)
    return table(["metric", *(f"{v} (n={len(summaries[v])})" for v in variants)], body)


class Family(NamedTuple):
    """The paired differences of every (number, variant) cell, one Holm family."""

    cells: dict  # (key, variant) -> paired difference or None
    adjusted: dict  # (key, variant) -> Holm-adjusted p of a tested cell
    level: float  # the first step of Holm: the level a null's MDE is stated at


def family_of(summaries: dict, reference: str, rows) -> Family:
    """Paired-by-seed differences from the reference over every row; a finding needs a
    Holm-adjusted t-test p < 0.05 over every tested cell. A difference equal in every seed (a
    constant) is no test and never joins the family."""
    others = [v for v in summaries if v != reference]
    cells = {
        (key, v): paired_difference(by_seed(summaries[v], key), by_seed(summaries[reference], key))
        for key, _ in rows
        for v in others
    }
    tested = [c for c, d in cells.items() if d is not None and d.n >= MIN_SEEDS and d.sd > 0]
    adjusted = dict(zip(tested, holm([cells[c].p for c in tested]), strict=True))
    return Family(cells, adjusted, ALPHA / max(1, len(tested)))


def difference_table(summaries: dict, reference: str, rows, family: Family | None = None):
    """Paired-by-seed differences from the reference with 95% t-intervals, for `rows` of
    `family` (default: the rows alone are the family). Below 6 seeds the exact sign-flip p
    stands beside; every null names the smallest difference it could have detected (80%
    power). Rows with nothing to show are left out; [] when none is left."""
    family = family or family_of(summaries, reference, rows)
    others = [v for v in summaries if v != reference]
    body = [[label, *(difference_cell(family.cells[key, v], family.adjusted.get((key, v)),
                                      family.level)
                      for v in others)]
            for key, label in rows
            if not all(_nothing(family.cells[key, v]) for v in others)]  # fmt: skip
    return table(["metric", *(f"{v} − {reference}" for v in others)], body) if body else []


def _nothing(d) -> bool:
    """No difference to show: unmeasured, or exactly 0 in every seed (a row that does not
    apply, such as a uniform baseline the variants share)."""
    return d is None or (d.mean == 0 and (d.n < 2 or d.sd == 0))


def draw_figures(groups: dict, out: Path, opts: Options) -> dict:
    """Every stage's figures; returns {key: PNG file name}."""
    figures: dict = {}
    for stage in STAGES:
        figures.update(stage.figures(groups, out, opts))
    return figures


def has_report(folder: Path) -> bool:
    """A report folder an earlier posleak wrote (before it marked its folders)."""
    return (folder / "report.md").is_file() and "posleak" in (folder / "report.md").read_text()


def definitions_link(out: Path) -> str:
    science = ROOT / "docs" / "science.md"
    if science.exists():
        return f"[docs/science.md]({os.path.relpath(science, out.resolve())})"
    return "docs/science.md in the posleak repository"


def write_report(groups: dict, summaries: dict, out: Path, reference: str | None = None) -> Path:
    owned_dir(out, "report folder", has_report)
    reference = reference or ("rope" if "rope" in summaries else next(iter(summaries)))
    if reference not in summaries:
        raise ValueError(f"reference variant {reference!r} is not among {sorted(summaries)}")
    opts = Options.of_summary(next(iter(summaries.values()))[0])  # matched: check_matched
    fig = draw_figures(groups, out, opts)
    rows = headline_rows(summaries, opts)
    family = family_of(summaries, reference, rows)
    lines = [*_header(summaries, out), *_reading(reference)]
    parent = []  # a stage's heading that had nothing of its own to show, until a child does
    for title, owned, keys, level in sections_of(opts, rows):
        tables = _tables(summaries, reference, owned, family)
        part = _section("#" * level + " " + title, tables, keys, fig)
        if level == 2:
            parent = [] if part else ["", f"## {title}"]
        elif part:
            part, parent = parent + part, []
        lines += part
    lines += _runs_table(summaries)
    report = out / "report.md"
    markdown = "\n".join(lines) + "\n"
    atomic_write(report, markdown)
    title = "posleak variant comparison"
    atomic_write(out / "report.html", to_html(markdown, out, title))
    headline = {v: {k: by_seed(items, k) for k, _ in rows} for v, items in summaries.items()}
    atomic_write(out / "headline.json", json.dumps(headline, indent=2) + "\n")
    return report


def sections_of(opts: Options, rows) -> list[tuple[str, list, tuple, int]]:
    """(title, the rows it tabulates, its figure keys, heading level) in the stages' order:
    a stage's numbers sit beside the figures that draw them (under a heading of its own over
    its sections where it has several); the engine's own numbers (validation loss) open."""
    measured = dict(rows)

    def owned(numbers) -> list:
        keys = [n.key(**c) for n in numbers for c in n.values_of(opts)]
        return [(k, measured[k]) for k in keys if k in measured]

    out = [("Training", owned(ENGINE_NUMBERS), (), 2)]
    for stage in STAGES:
        mine, sections = owned(stage.numbers), stage.sections(opts)
        if len(sections) == 1:
            out.append((sections[0].title, mine, sections[0].figures, 2))
            continue
        out.append((stage.title or stage.name[:1].upper() + stage.name[1:], mine, (), 2))
        out += [(section.title, [], section.figures, 3) for section in sections]
    return out


def _header(summaries: dict, out: Path) -> list[str]:
    first = next(iter(summaries.values()))[0]
    return [
        "# Where does absolute position come from? Variant comparison",
        "",
        f"Runs: {sum(len(v) for v in summaries.values())} in {len(summaries)} variants, analysed "
        f"on {first['seqs']} held-out sequences of {first['seq_len']} tokens "
        f"from `{first['data']}`. "
        f"Made by {provenance.line(provenance.provenance())}",
        "",
        f"Definitions version {DEFINITIONS}: {definitions_link(out)}.",
    ]


def _reading(reference: str) -> list[str]:
    return [
        "",
        "Each section gives its numbers as **levels** (mean ± sd over seeds [95% t-interval of "
        f"the mean]) and as **differences from `{reference}`**, paired by seed (mean difference "
        "over the seeds both variants share, 95% t-interval with n − 1 degrees of freedom, "
        "and the paired t-test's p), then its figures. Every difference cell of the report is "
        "one family: **finding** means a Holm-adjusted p below 0.05 over all its tested "
        f"cells, with at least {MIN_SEEDS} seeds. Below 6 seeds the exact sign-flip p stands "
        "beside (with 3 seeds it cannot go below 0.25). A null names its minimum detectable "
        "effect (MDE: the difference a two-sided test at the family's first Holm level finds "
        "with 80% power at this spread and n); it is not detected at this scale, not shown "
        "absent.",
    ]


def _tables(summaries: dict, reference: str, rows, family: Family) -> list[str]:
    if not rows:
        return []
    differences = difference_table(summaries, reference, rows, family)
    return [
        "",
        *level_table(summaries, rows),
        *(["", f"Differences from `{reference}`, paired by seed:", "", *differences]
          if differences else []),
    ]  # fmt: skip


def _section(heading: str, tables: list[str], keys, fig: dict) -> list[str]:
    """A section: its numbers, then its figures; none where it has neither for these runs
    (the light cone's maps need a window to cut bands by)."""
    drawn = [k for k in keys if k in fig]
    if not tables and not drawn:
        return []
    return ["", heading, *tables, *(f"\n![{k}]({fig[k]})" for k in drawn)]


def _runs_table(summaries: dict) -> list[str]:
    rows = [
        [variant, s["seed"], f"`{Path(s['run']).name}`", "—" if s["step"] is None else s["step"],
         number(s["val_loss"])]
        for variant, items in summaries.items()
        for s in items
    ]  # fmt: skip
    return ["", "## Runs", "", *table(["variant", "seed", "run", "step", "val loss"], rows)]
