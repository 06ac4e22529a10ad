"""Tidy records: one measured number per row, labelled by where it was measured.

Fields: run, variant, seed, site, layer, head, query, metric, value, condition, std, lo, hi,
n, definitions. `site` says what `layer` counts: "resid" (residual sites, 0 = the embedding
output) or "attn" (attention layers, blocks from 0); None for run-level numbers. `layer`,
`head`, `query` and `condition` are None where they do not apply (a head of None means pooled
over heads); `condition` is a dict of named fields (e.g. {"swap": "mean", "part": "rest"}),
never a packed string; `lo`/`hi` bound a 95% bootstrap interval over
sequences where one was computed; `definitions` is the version of docs/science.md the
number follows. Plots and reports are pure functions of these rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from posleak.analysis.maths.measures import DEFINITIONS

FIELDS = (
    "run",
    "variant",
    "seed",
    "site",
    "layer",
    "head",
    "query",
    "metric",
    "value",
    "condition",
    "std",
    "lo",
    "hi",
    "n",
    "definitions",
)


class Recorder:
    """Rows of one analysis. `sites` maps every metric to its site (each stage declares its
    own); a metric no stage declares is refused, never silently given a site."""

    def __init__(self, sites: dict[str, str | None], **labels):
        self.sites, self.labels = sites, labels
        self.rows: list[dict] = []

    def add(
        self,
        metric,
        value,
        layer=None,
        head=None,
        query=None,
        condition=None,
        std=None,
        lo=None,
        hi=None,
        n=None,
    ):
        self.rows.append(
            {
                **self.labels,
                "site": self._site(metric),
                "layer": layer,
                "head": head,
                "query": query,
                "metric": metric,
                "value": _num(value),
                "condition": _condition(condition),
                "std": _num(std),
                "lo": _num(lo),
                "hi": _num(hi),
                "n": n,
                "definitions": DEFINITIONS,
            }
        )

    def _site(self, metric: str) -> str | None:
        try:
            return self.sites[metric]
        except KeyError:
            raise KeyError(
                f"metric {metric!r} is declared by no stage (analysis/stages/)"
            ) from None


def _condition(condition) -> dict | None:
    """A record's condition: None, or a dict of named scalar fields in one key order."""
    if condition is None or condition == {}:
        return None
    if not isinstance(condition, dict):
        raise TypeError(f"a record's condition is a dict of named fields, not {condition!r}")
    for key, value in condition.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"condition field {key!r} = {value!r}: names are str, values scalars")
    return dict(sorted(condition.items()))


def matches(row: dict, condition: dict | None) -> bool:
    """Whether a record's condition is exactly `condition` (None: no condition)."""
    return (row["condition"] or None) == (_condition(condition) if condition else None)


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def read(path: Path) -> list[dict]:
    """Every row of a records.jsonl; a damaged file is named with the line that fails."""
    redo = "delete the analysis folder and run `posleak analyze` again"
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line} is not UTF-8 text (a damaged file); {redo}"
        ) from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(
                f"{path}: line {number} is not valid JSON (a truncated or edited file); {redo}"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("metric"), str):
            raise ValueError(
                f"{path}: line {number} is not a record (a JSON object with a metric); {redo}"
            )
        rows.append({field: row.get(field) for field in FIELDS} | row)
    return rows


def records_files(paths) -> list[Path]:
    """records.jsonl files from files, analysis folders, run folders or sweep folders."""
    found = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        candidates = [p, p / "records.jsonl", p / "analysis" / "records.jsonl"]
        direct = [c for c in candidates if c.is_file()]
        here = direct[:1] or sorted(p.glob("*/analysis/records.jsonl"))
        if not here:
            raise FileNotFoundError(f"{p} holds no records.jsonl; run `posleak analyze` first")
        found += here
    return found


INTEGERS = ("seed", "layer", "head", "query", "n", "definitions")  # integer columns, NA-able


def load_records(paths):
    """Every record of the given analyses as a pandas DataFrame (one row per number): layer,
    head, query, n and seed as nullable integers, `condition` as compact JSON (NA where
    none, so it groups and compares), and each condition field as a column of its own,
    `condition.FIELD`."""
    try:
        import pandas
    except ImportError:
        raise ImportError("load_records needs pandas: pip install pandas") from None
    rows = [row for path in records_files(paths) for row in read(path)]
    fields = sorted({k for r in rows for k in (r.get("condition") or {})})
    frame = pandas.DataFrame(rows, columns=list(FIELDS))
    for field in fields:
        frame[f"condition.{field}"] = [(r.get("condition") or {}).get(field) for r in rows]
    frame["condition"] = [
        json.dumps(r["condition"], sort_keys=True) if r.get("condition") else None for r in rows
    ]
    for column in INTEGERS:
        frame[column] = frame[column].astype("Int64")
    return frame


ANY = object()  # select(..., condition=ANY): whatever the condition


def select(rows: list[dict], metric: str, condition=ANY, **where) -> list[dict]:
    """The rows of one metric at exactly this condition (default: any) and these values."""
    return [
        r
        for r in rows
        if r["metric"] == metric
        and (condition is ANY or matches(r, condition))
        and all(r.get(k) == v for k, v in where.items())
    ]


def curve(rows: list[dict], metric: str, x: str, **where) -> dict:
    """{x value: value} of one run (several rows at one x are averaged)."""
    acc = defaultdict(list)
    for r in select(rows, metric, **where):
        if r["value"] is not None:
            acc[r[x]].append(r["value"])
    return {k: sum(v) / len(v) for k, v in sorted(acc.items(), key=lambda kv: kv[0])}


def across_runs(runs: list[list[dict]], metric: str, x: str, **where) -> dict:
    """{x: (mean, std over runs, n runs)}: the seed-to-seed spread of a curve."""
    per_x = defaultdict(list)
    for rows in runs:
        for k, v in curve(rows, metric, x, **where).items():
            per_x[k].append(v)
    return {k: mean_std(v) for k, v in per_x.items()}


def mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def by_layer(rows, metric, head=None, query=None, condition=None) -> dict:
    """{layer: value} of one metric at the given head, query and condition."""
    return {
        r["layer"]: r["value"]
        for r in rows
        if r["metric"] == metric
        and r["head"] == head
        and r["query"] == query
        and matches(r, condition)
    }


def per_layer_queries(rows, metric, condition=None, head=None) -> dict:
    """{layer: {query: value}} of a per-query metric."""
    out: dict = defaultdict(dict)
    for r in rows:
        if (
            r["metric"] == metric
            and r["head"] == head
            and matches(r, condition)
            and r["query"] is not None
        ):
            out[r["layer"]][r["query"]] = r["value"]
    return out


def finite_mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def early_square_sum(curve: dict, k: int | None) -> float:
    """sum over 1 <= i < k of C(i)^2 (C recorded as a root, clamped at 0)."""
    return sum((v or 0.0) ** 2 for i, v in curve.items() if i >= 1 and (k is None or i < k))


def removed_over_layers(rows, kind: str, k: int | None) -> float | None:
    """1 - sum_{layers, 1<=i<k} C_swap^2 / sum C^2: the BOS replacement's removed share pooled
    over layers (per-layer ratios explode where a layer has almost no signal)."""
    base = per_layer_queries(rows, "c_res")
    swap = per_layer_queries(rows, "c_res", condition={"swap": kind})
    if not swap:
        return None
    orig = sum(early_square_sum(base[l], k) for l in base)
    new = sum(early_square_sum(swap[l], k) for l in swap)
    return 1 - new / orig if orig > 0 else None
