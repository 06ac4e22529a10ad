"""Reported numbers: one number per run that reports show, declared once by the stage that
measures it.

A `Reported` names its metric, the condition fields it is indexed by (each with the values it
takes, fixed or read from the analysis options), its label template, unit and format, and how
its value is read from the analysis's records. analysis.json's `headline` holds every declared
number under the key `Reported.key` composes; the per-run report, compare and the studies read
them back through the same object, so a misspelt number or condition raises at once with the
names that exist instead of printing an empty cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from posleak.analysis.engine.options import Options

# how a per-layer metric becomes one number per run (rows at head None, query None)
REDUCTIONS = ("record", "last", "max", "min", "mean", "mean_from_1")


@dataclass(frozen=True)
class Reported:
    """One number per run. `conditions` maps each condition field to its values: a tuple, or
    the name of the Options field that lists them. The value is read from the records: the
    run-level record of `metric` ("record"), or a reduction (`reduce`) over layers of the
    per-layer records of `metric`, or of the per-layer curve `curve` that a stage's
    per_layer() draws; a number none of these gives declares `compute(rows, layers, opts,
    condition)`."""

    name: str
    label: str  # formatted with the options' fields and the condition's
    unit: str = ""  # "nats", "share", "R²"; "" for a pure number
    fmt: str = ".3g"
    metric: str | None = None  # the records' metric (default: name)
    conditions: dict = field(default_factory=dict)
    reduce: str = "record"
    curve: str | None = None  # a per-layer curve of analysis.json, reduced over layers
    where: dict = field(default_factory=dict)  # fixed condition fields its records have
    # (the every-layer knockout: {"layer": "all"}), not part of its key
    parameters: tuple = ()  # condition fields that record a setting (the window w), not an
    # index: records match whatever their value
    compute: Callable | None = None

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"{self.name}: reduce must be one of {REDUCTIONS}, not {self.reduce}")

    @property
    def source(self) -> str:
        return self.metric or self.name

    def values_of(self, opts: Options) -> list[dict]:
        """Every condition this number takes under `opts`, as dicts."""
        fields = list(self.conditions)
        choices = [_choices(self.conditions[f], opts) for f in fields]
        return [dict(zip(fields, combo, strict=True)) for combo in itertools.product(*choices)]

    def check(self, condition: dict) -> dict:
        """The condition, refused unless it names exactly the declared fields."""
        if set(condition) != set(self.conditions):
            declared = sorted(self.conditions) or "nothing"
            raise KeyError(
                f"reported number {self.name!r} is indexed by {declared}, "
                f"not {sorted(condition) or 'nothing'}"
            )
        return condition

    def key(self, **condition) -> str:
        """The number's key in analysis.json's headline: its name and condition, in one
        spelling (the only place it is composed)."""
        self.check(condition)
        return self.name + "".join(f"[{k}={_text(condition[k])}]" for k in sorted(condition))

    def title(self, opts: Options, **condition) -> str:
        """The label, formatted from the options and the condition, with its unit."""
        fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
        fields["early_last"] = opts.early_queries - 1  # "queries 1–{early_last}"
        text = self.label.format(**fields, **{k: _text(v) for k, v in condition.items()})
        return f"{text} ({self.unit})" if self.unit else text

    def format(self, value) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "–"
        if self.unit == "share":
            return f"{value:.0%}"
        return f"{value:{self.fmt}}"

    def value(self, rows: list[dict], layers: dict, opts: Options, condition: dict):
        """This number of one analysis, from its records (and the per-layer curves that
        analysis.json keeps of them); None where it was not measured."""
        if self.compute is not None:
            return self.compute(rows, layers, opts, condition)
        if self.curve is not None:
            return reduce_layers(layers.get(self.curve) or {}, self.reduce)
        mine = [
            r
            for r in rows
            if r["metric"] == self.source
            and r["head"] is None
            and r["query"] is None
            and self._indexed(r["condition"]) == {**self.where, **condition}
        ]
        if self.reduce == "record":
            found = [r["value"] for r in mine if r["layer"] is None]
            return found[0] if found else None
        curve = {r["layer"]: r["value"] for r in mine if r["layer"] is not None}
        return reduce_layers(curve, self.reduce)

    def _indexed(self, condition: dict | None) -> dict:
        return {k: v for k, v in (condition or {}).items() if k not in self.parameters}


def reduce_layers(curve: dict, how: str) -> float | None:
    values = {l: v for l, v in curve.items() if v is not None and math.isfinite(v)}
    if how == "last":
        return curve[max(curve)] if curve else None
    if how == "mean_from_1":
        values = {l: v for l, v in values.items() if l >= 1}
    if not values:
        return None
    if how == "max":
        return max(values.values())
    if how == "min":
        return min(values.values())
    return sum(values.values()) / len(values)


def _choices(spec, opts: Options) -> tuple:
    """A condition field's values: a tuple, an Options field's name, or a function of them."""
    if isinstance(spec, str):
        return tuple(getattr(opts, spec))
    return tuple(spec(opts)) if callable(spec) else tuple(spec)


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class Catalogue:
    """Every declared number by name (analysis/stages/ declare them)."""

    def __init__(self, numbers):
        self.by_name: dict[str, Reported] = {}
        for number in numbers:
            if number.name in self.by_name:
                raise RuntimeError(f"reported number {number.name!r} is declared twice")
            self.by_name[number.name] = number

    def __getitem__(self, name: str) -> Reported:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(
                f"no reported number {name!r}; declared: {', '.join(sorted(self.by_name))}"
            ) from None

    def __iter__(self):
        return iter(self.by_name.values())

    def headline(self, rows: list[dict], layers: dict, opts: Options) -> dict:
        """{key: value} of every declared number of one analysis (None where not measured)."""
        return {
            number.key(**cond): number.value(rows, layers, opts, cond)
            for number in self
            for cond in number.values_of(opts)
        }
