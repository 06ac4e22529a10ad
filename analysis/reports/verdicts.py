"""Verdicts on paired-by-seed contrasts: one family per table, fixed before the data, each
cell a paired t-interval decided by Holm's step-down adjustment (optionally behind a primary
cell tested first, at the full level: gatekeeping), every null beside the minimum detectable
effect at the level that decides it."""

from __future__ import annotations

from pathlib import Path

from posleak.analysis.maths.seeds import (
    MIN_SEEDS,
    PairedDifference,
    holm,
    minimum_detectable,
    paired_difference,
    sign_flip_p,
)
from posleak.analysis.reports import plots
from posleak.report import number, table

ALPHA = 0.05


def difference_cell(d: PairedDifference | None, holm_p: float | None, level: float = ALPHA):
    """A paired difference for a table cell: interval, t-test p, adjusted p (the table's
    family), the sign-flip p below 6 seeds, and **finding** or the MDE of a null at `level`,
    the level that decides this cell."""
    if d is None:
        return "–"
    if d.n < MIN_SEEDS:
        interval = "" if d.n < 2 else f" [{number(d.lo)}, {number(d.hi)}]"
        return f"{number(d.mean)}{interval} (n={d.n} < {MIN_SEEDS}: no test)"
    if d.sd == 0:
        return f"{number(d.mean)} in every seed (n={d.n}; constant: no test)"
    text = f"{number(d.mean)} [{number(d.lo)}, {number(d.hi)}], p {number(d.p, 2)}"
    if holm_p is None:
        return text + "; not tested: the primary contrast it waits on is not a finding"
    text += f", Holm {number(holm_p, 2)}"
    if d.n < 6:
        text += f", sign-flip p {number(sign_flip_p(list(d.diffs)), 2)}"
    if holm_p < ALPHA:
        return text + " **finding**"
    mde = number(minimum_detectable(d.sd, d.n, level), 2)
    if d.p < ALPHA:  # its own interval excludes 0; the family's correction decides
        return (
            text + f"; not a finding after Holm, though its interval excludes 0 (MDE {mde} at "
            f"level {number(level, 2)})"
        )
    return text + f"; not detected (MDE {mde} at level {number(level, 2)})"


class Verdicts:
    """One family of paired contrasts: each a label, the values by seed and the reference by
    seed. With `primary`, the first cell is tested alone at 0.05 and the others, a Holm
    family, only when it is a finding (gatekeeping); without, all cells are one Holm family.
    Its table and the words for one contrast come from the same tests."""

    def __init__(self, cells: list[tuple[str, dict, dict]], primary: bool = False):
        self.cells = cells
        self.diffs = [paired_difference(values, ref) for _, values, ref in cells]
        tested = [  # a difference equal in every seed (a constant) is no test: left out
            i for i, d in enumerate(self.diffs) if d is not None and d.n >= MIN_SEEDS and d.sd > 0
        ]
        self.adjusted: dict = {}
        self.level: dict = {}
        rest = tested
        if primary and tested and tested[0] == 0:
            self.adjusted[0], self.level[0] = self.diffs[0].p, ALPHA
            rest = tested[1:] if self.diffs[0].p < ALPHA else []
        for i, p in zip(rest, holm([self.diffs[i].p for i in rest]), strict=True):
            self.adjusted[i], self.level[i] = p, ALPHA / len(rest)

    def table(self, against: str) -> list[str]:
        rows = [
            [label, self.cell(i)]
            for i, ((label, _, _), _) in enumerate(zip(self.cells, self.diffs, strict=True))
        ]
        return table(["contrast", f"difference from {against}, 95% t-interval"], rows)

    def cell(self, i: int) -> str:
        return difference_cell(self.diffs[i], self.adjusted.get(i), self.level.get(i, ALPHA))

    def words(self, label: str) -> str:
        """The verdict on one contrast: a finding and its sign; a contrast whose own interval
        excludes 0 but that Holm's correction leaves above 0.05, said as such; or not detected,
        with its MDE at the level that decides it."""
        i = next(k for k, (name, _, _) in enumerate(self.cells) if name == label)
        d = self.diffs[i]
        if d is None:
            return "not measured"
        if d.n < MIN_SEEDS:
            return f"{number(d.mean, 3)} with n={d.n} < {MIN_SEEDS} seeds: not tested"
        if d.sd == 0:
            return f"{number(d.mean, 3)} in every seed: a constant, not tested"
        interval = f"{number(d.mean, 3)} [{number(d.lo, 3)}, {number(d.hi, 3)}]"
        if i not in self.adjusted:
            return f"{interval}, not tested (the primary contrast is not a finding)"
        if self.adjusted[i] < ALPHA:
            return f"**{'higher' if d.mean > 0 else 'lower'}**, {interval}"
        if d.p < ALPHA:
            return (
                f"not a finding after Holm correction (p {number(d.p, 2)}, Holm "
                f"{number(self.adjusted[i], 2)}), {interval}, though alone its interval excludes 0"
            )
        mde = number(minimum_detectable(d.sd, d.n, self.level[i]), 2)
        return (
            f"not detected at this scale, {interval} (smallest detectable at level "
            f"{number(self.level[i], 2)}: {mde})"
        )

    def forest_rows(self, standardised: bool = False) -> list[tuple]:
        """(label, mean, lo, hi, finding, MDE of a null at its deciding level or None) of each
        tested contrast, for plots.forest; `standardised`: each in units of its differences'
        sd over seeds (d_z), so that contrasts of different quantities share an axis."""
        rows = []
        for i, ((label, _, _), d) in enumerate(zip(self.cells, self.diffs, strict=True)):
            if d is None or d.n < MIN_SEEDS or (standardised and not d.sd > 0):
                continue
            finding = self.adjusted.get(i, 1.0) < ALPHA
            mde = None if finding else minimum_detectable(d.sd, d.n, self.level.get(i, ALPHA))
            unit = d.sd if standardised else 1.0
            scaled = [None if x is None else x / unit for x in (d.mean, d.lo, d.hi, mde)]
            rows.append((label, *scaled[:3], finding, scaled[3]))
        return rows

    def summary(self) -> str:
        """What the family found: its findings, or that there are none, with the first
        tested contrast's verdict (the primary one under gatekeeping) and how many contrasts
        were tested (gatekeeping tests none of the others after a null primary)."""
        labels = [label for label, _, _ in self.cells]
        tested = sorted(self.adjusted)
        found = [labels[i] for i in tested if self.adjusted[i] < ALPHA]
        if not tested:
            return "nothing tested (fewer than 3 seeds, or a constant, in every contrast)"
        if not found:
            first = labels[tested[0]]
            return (
                f"no finding ({len(tested)} of {len(labels)} contrasts tested); "
                f"{first}: {self.words(first)}"
            )
        return f"{len(found)} of {len(tested)} tested contrasts are findings: " + "; ".join(
            f"{label} ({self.words(label)})" for label in found
        )

    @property
    def nulls(self) -> int:
        return sum(1 for i in self.adjusted if self.adjusted[i] >= ALPHA)


def forest_figure(
    family: Verdicts, out: Path, name: str, xlabel: str | None, title: str
) -> list[str]:
    """The family's verdict figure (plots.forest) written to out/name, as report lines; none
    where no contrast was tested. xlabel None: the contrasts measure different quantities,
    drawn standardised (difference / its sd over seeds)."""
    rows = family.forest_rows(standardised=xlabel is None)
    xlabel = xlabel or "paired difference / its sd over seeds (d_z)"
    if not rows:
        return []
    return ["", f"![{title}]({plots.forest(out / name, rows, xlabel, title)})"]


def verdict_box(families: list[tuple[str, Verdicts]]) -> list[str]:
    """A report's first section: each question with what its family found."""
    if not families:
        return []
    return [
        "## Verdicts at a glance",
        "",
        *(f"- **{question}** {family.summary()}." for question, family in families),
        "",
    ]
