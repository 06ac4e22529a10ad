"""The one reader of reported numbers across analyses: a number is named by its declaration
(analysis/engine/numbers.py), never by a key spelt by hand, so a misspelt number or condition
raises at once with the names that exist."""

from __future__ import annotations

from posleak.analysis.engine.numbers import Reported
from posleak.analysis.engine.options import Options
from posleak.analysis.stages import NUMBERS


def number(name: str) -> Reported:
    return NUMBERS[name]


def value(summary: dict, name: str, **condition):
    """One declared number of one analysis (None where it was not measured)."""
    return summary["headline"].get(NUMBERS[name].key(**condition))


def headline(name: str, **condition):
    """The function summary -> that number (checked now, read later)."""
    key = NUMBERS[name].key(**condition)
    return lambda summary: summary["headline"].get(key)


def per_seed(summaries: list[dict], name: str, **condition) -> dict:
    """{seed: value} of one declared number over a variant's analyses."""
    key = NUMBERS[name].key(**condition)
    return {s["seed"]: s["headline"].get(key) for s in summaries}


def rows(opts: Options) -> list[tuple[str, str]]:
    """(key, label) of every declared number under these options, in the stages' order."""
    return [
        (number.key(**condition), number.title(opts, **condition))
        for number in NUMBERS
        for condition in number.values_of(opts)
    ]


def headline_frame(paths):
    """Every declared number of the given analyses as a pandas DataFrame, one row per (run,
    number, condition): run, variant, seed, step, number, its condition fields as
    `condition.FIELD` columns, value and unit."""
    import pandas

    from posleak.analysis.engine.folder import AnalysisDir
    from posleak.analysis.engine.records import records_files

    rows = []
    for path in records_files(paths):
        summary = AnalysisDir(path.parent).read_summary()
        opts = Options.of_summary(summary)
        for number in NUMBERS:
            for condition in number.values_of(opts):
                rows.append(
                    {
                        "run": summary["run"],
                        "variant": summary["variant"],
                        "seed": summary["seed"],
                        "step": summary.get("step"),
                        "number": number.name,
                        **{f"condition.{k}": v for k, v in condition.items()},
                        "value": summary["headline"].get(number.key(**condition)),
                        "unit": number.unit,
                    }
                )
    frame = pandas.DataFrame(rows)
    for column in ("seed", "step"):
        frame[column] = frame[column].astype("Int64")
    return frame
