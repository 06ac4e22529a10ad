"""The study engine: what every `posleak study` report and `posleak pretrained-study` share.

A sweep's finished runs and the roles its `[study]` table gives its variants (reference,
control, window pairs...), analyses made or reused under one rule (engine/reuse.py), the
numbers read back by seed, and a report written as a list of sections: each section returns
its lines and adds the verdict families it decides to `study.families`, which the verdict
box at the top lists. The text, sink and light-cone reports are such section lists.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.options import Options
from posleak.analysis.engine.reuse import make_missing
from posleak.analysis.maths.seeds import mean_interval
from posleak.analysis.reports import compare, plots, results
from posleak.analysis.reports.verdicts import forest_figure, verdict_box
from posleak.files import atomic_write, owned_dir
from posleak.train.rundir import RunDir
from posleak.train.sweep import read_study

REPORTS = ("text", "sinks", "sinks-text", "light-cone")
DEFAULT_ROLES = {  # sweep folders planned before sweeps recorded their [study] table
    "text": {"reference": "rope", "control": "sink", "window": "swa", "ntk": "ntk"},
    "sinks": {
        "reference": "rope",
        "nobos": "rope-nobos",
        "control": "sink",
        "window": "swa",
        "ntk": "ntk",
    },
    "sinks-text": {"reference": "mixture", "control": "text", "data": "bible"},
    "light-cone": {
        "window_pairs": [
            ["swa-doc", "rope-doc"],
            ["nope-swa-doc", "nope-doc"],
            ["swa-rand", "rope-rand"],
            ["nope-swa-rand", "nope-rand"],
        ],
        "ntk_pairs": [["ntk-doc", "rope-doc"], ["ntk-rand", "rope-rand"]],
    },
}
REQUIRED = {
    "text": ("reference",),
    "sinks": ("reference",),
    "sinks-text": ("reference", "control", "data"),
    "light-cone": ("window_pairs",),
}


class Roles:
    """The report a sweep asks for and the variant each role names."""

    def __init__(self, report: str, names: dict):
        if report not in REPORTS:
            raise ValueError(
                f"study.report = {report!r} is not a report; give one of {list(REPORTS)} in "
                "the sweep file's [study] table"
            )
        missing = [role for role in REQUIRED[report] if role not in names]
        if missing:
            raise ValueError(
                f"the {report} report needs the role{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} in the sweep file's [study] table, e.g. "
                f"{missing[0]} = {json.dumps(DEFAULT_ROLES[report][missing[0]])}"
            )
        self.report, self.names = report, names

    def get(self, role: str):
        """The variant (or list) a role names; None when the sweep gives it none."""
        return self.names.get(role)

    def __getitem__(self, role: str):
        if role not in self.names:
            raise KeyError(f"no role {role!r} in the [study] table; roles: {sorted(self.names)}")
        return self.names[role]


def roles_of(sweep_dir: Path, report: str = "auto") -> Roles:
    """The sweep folder's [study] table; a folder planned without one reads as before: a
    document-aligned run makes it a light-cone sweep, Bigram-Backcopy runs a sink study.
    A report asked for by name other than the table's takes that report's usual roles."""
    table = read_study(sweep_dir) or {}
    planned = table.get("report") or detect_report(sweep_dir)
    names = {k: v for k, v in table.items() if k != "report"}
    if report not in ("auto", planned):
        return Roles(report, DEFAULT_ROLES.get(report, {}))
    return Roles(planned, names or DEFAULT_ROLES.get(planned, {}))


def detect_report(sweep_dir: Path) -> str:
    data = [
        RunDir(config.parent).read_config()[0].data
        for config in Path(sweep_dir).glob("*/config.toml")
    ]
    if any(d.align == "document" for d in data):
        return "light-cone"
    return "sinks" if data and all(d.source == "backcopy" for d in data) else "text"


class SweepStudy:
    """The finished runs of one sweep, its roles, and the analyses a report makes of them."""

    def __init__(self, sweep_dir: Path, seqs: int, jobs: int = 1, roles: Roles | None = None):
        self.sweep_dir, self.seqs, self.jobs = Path(sweep_dir), seqs, jobs
        self.roles = roles or roles_of(self.sweep_dir)
        self.paths = [p for p in compare.find_runs([str(sweep_dir)]) if RunDir(p).summary()]
        if not self.paths:
            raise FileNotFoundError(f"{sweep_dir} holds no finished runs yet")
        self.window = compare.contrast_window_of(self.paths)
        self.planned = len(list((self.sweep_dir / "configs").glob("*.toml")))
        self.families: list = []  # (question, Verdicts[, unit]) as the sections decide them

    def options(self, **changes) -> Options:
        """The options of every analysis this study makes: its sequences, the contrast
        window its sweep implies, the data its [study] table names; plus `changes`."""
        data = self.roles.get("data")
        return Options(seqs=self.seqs, contrast_window=self.window, data=data, **changes)

    def make(self, wanted: list[tuple[Path, Options, Path]], tag: str = "study") -> None:
        """Analyse each (run, options, folder) not already current there, `jobs` at a time."""
        make_missing(wanted, self.jobs, tag)


class Study(SweepStudy):
    """A sweep's runs grouped by variant, each with its main analysis (RUN/analysis, made
    with the study's options): the text and sink reports read these."""

    def __init__(self, sweep_dir: Path, seqs: int, jobs: int = 1, roles: Roles | None = None):
        super().__init__(sweep_dir, seqs, jobs, roles)
        base = self.options()
        self.groups, self.summaries = compare.load_groups(self.paths, base, exact=True, jobs=jobs)
        self.opts = Options.of_summary(next(iter(self.summaries.values()))[0])
        self.text = [v for v, s in self.summaries.items() if s[0]["data"] != "markov"]
        self.markov = [v for v in self.summaries if v not in self.text]
        self.reference, self.control = self.roles.get("reference"), self.roles.get("control")
        self.window_variant, self.ntk = self.roles.get("window"), self.roles.get("ntk")
        self.nobos = self.roles.get("nobos")
        self.step0_stages: tuple = ()  # () = every stage (see at_step)
        self.full_run: tuple | None = None

    def at_step(self, summary: dict, step: int) -> Options:
        """The options of a run's analysis at checkpoint `step` (RUN/analysis-stepS). A report
        may name the stages it reads at step 0 (step0_stages), so that those analyses run
        only what the claims pair with, except in the run whose every checkpoint it reads
        (full_run: variant and seed)."""
        run = (summary.get("variant"), summary.get("seed"))
        if step == 0 and self.step0_stages and run != self.full_run:
            return self.options(step=step, stages=self.step0_stages)
        return self.options(step=step)

    def runs_of(self, variant: str | None) -> list[dict]:
        return sorted(self.summaries.get(variant, []), key=lambda s: s["seed"])

    def extra(self, summary: dict, name: str, opts: Options) -> dict:
        """An additional analysis of one run, kept in RUN/name and reused when current."""
        self.prefetch([(summary, name, opts)])
        return AnalysisDir(Path(summary["run"]) / name).read_summary()

    def prefetch(self, wanted: list[tuple[dict, str, Options]]) -> None:
        """Make the additional analyses (summary, name, options) that are not current: a
        section asks for all of its own first, so they run `jobs` at a time."""
        self.make([(Path(s["run"]), opts, Path(s["run"]) / name) for s, name, opts in wanted])


STEP0 = "analysis-step0"  # RUN/STEP0: a run analysed at its initial weights (step 0)


# ---------------------------------------------------------------- numbers by seed
headline = results.headline  # summary -> one declared number


def per_seed(summaries: list[dict], number_of) -> dict:
    return {s["seed"]: number_of(s) for s in summaries}


def fingerprint_bos_max(summary: dict) -> float | None:
    """Largest dispersion of the position-0 output across inputs sharing BOS (0 = identical)."""
    values = summary["per_layer"]["fingerprint_dispersion_bos"].values()
    return max(values, default=None)


def records_of(study: Study, variant: str) -> dict:
    """{seed: records} of a variant's runs."""
    summaries = study.summaries.get(variant, [])
    return {
        s["seed"]: rows for s, rows in zip(summaries, study.groups.get(variant, []), strict=True)
    }


def by_records(study: Study, variant: str, number_of) -> dict:
    return {seed: number_of(rows) for seed, rows in records_of(study, variant).items()}


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


def zeros(values: dict) -> dict:
    return dict.fromkeys(values, 0.0)


def val_curve(run: RunDir) -> dict:
    """{step: validation loss} from the run's metrics.jsonl (through its owner)."""
    records = (json.loads(line) for line in run.metrics_lines(up_to_step=math.inf))
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def loss_curves(out: Path, runs: dict) -> str:
    """The validation loss over training of each variant's runs ({variant: [RunDir]}): mean
    over seeds with its 95% t-interval, from metrics.jsonl; the figure's file name."""
    curves = {v: [val_curve(r) for r in by_seed] for v, by_seed in runs.items()}
    title = "Validation loss during training (mean over seeds, band: 95% t-interval)"
    return plots.seed_curves(out / "val_loss", curves, "step", "validation loss (nats)", title)


# ---------------------------------------------------------------- writing
def decided(study: SweepStudy, out: Path, lines: list[str], verdicts, name: str, unit) -> list:
    """A section that decides a family: its lines and its forest figure (out/name; unit None
    where the contrasts mix quantities), and the family joins the verdict box under the
    section's question (its title)."""
    question = lines[0].removeprefix("## ")
    study.families.append((question, verdicts))
    return [*lines, *forest_figure(verdicts, out, name, unit, question)]


def write_sections(study: SweepStudy, out: Path, head, sections) -> Path:
    """out/report.md: `head(study, out)`, the verdict box of the families the sections
    decide, then each section's lines, in order."""
    owned_dir(out, "report folder", compare.has_report)
    study.families = []
    body = [line for section in sections for line in (*section(study, out), "")]
    return write_report(out / "report.md", head(study, out), study.families, body)


def write_report(path: Path, head: list[str], families: list, body: list[str]) -> Path:
    """One Markdown report, written whole: its head, the verdict box of `families` (none:
    no box), a table of contents of the body's sections, its body."""
    box = verdict_box([(question, verdicts) for question, verdicts, *_ in families])
    lines = [*head, "", *box, *contents(body), *body]
    atomic_write(path, "\n".join(lines).rstrip() + "\n")
    return path


def contents(body: list[str]) -> list[str]:
    """A linked list of the body's sections (## headings), as GitHub anchors them."""
    titles = [line[3:] for line in body if line.startswith("## ")]
    if len(titles) < 2:
        return []
    return ["## Contents", "", *(f"- [{t}](#{anchor(t)})" for t in titles), ""]


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
