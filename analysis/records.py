"""Tidy records: one measured number per row, labelled by where it was measured.

Fields: run, variant, seed, site, layer, head, query, metric, value, condition, std, lo, hi,
n, definitions. `site` says what `layer` counts: "resid" (residual sites, 0 = the embedding
output) or "attn" (attention layers, blocks from 0); None for run-level numbers. `layer`,
`head`, `query` and `condition` are None where they do not apply (a head of None means pooled
over heads); `lo`/`hi` bound a 95% bootstrap interval over
sequences where one was computed; `definitions` is the version of docs/science.md the
number follows. Plots and reports are pure functions of these rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from posleak.analysis.measures import DEFINITIONS

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


RESIDUAL_METRICS = (
    "probe_r2",
    "probe_r2_log",
    "probe_mae",
    "probe_mae_log",
    "probe_lambda",
    "probe_lambda_log",
    "probe_mae_mean",
    "probe_mae_uniform",
    "fingerprint_dispersion",
    "fingerprint_cosine",
    "bos_swap_probe_r2_log",
    "knockout_probe_r2_log",
)
RUN_METRICS = ("loss_by_position", "loss_mean", "loss_beyond_train")


def site_of(metric: str) -> str | None:
    if metric in RESIDUAL_METRICS:
        return "resid"
    return None if metric in RUN_METRICS else "attn"


class Recorder:
    def __init__(self, **labels):
        self.labels = labels
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
                "site": site_of(metric),
                "layer": layer,
                "head": head,
                "query": query,
                "metric": metric,
                "value": _num(value),
                "condition": condition,
                "std": _num(std),
                "lo": _num(lo),
                "hi": _num(hi),
                "n": n,
                "definitions": DEFINITIONS,
            }
        )


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def read(path: Path) -> list[dict]:
    """Every row of a records.jsonl; a damaged file is named with the line that fails."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(
                f"{path}: line {number} is not valid JSON (a truncated or edited file); "
                "delete the analysis folder and run `posleak analyze` again"
            ) from None
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


def load_records(paths):
    """Every record of the given analyses as a pandas DataFrame (one row per number)."""
    try:
        import pandas
    except ImportError:
        raise ImportError("load_records needs pandas: pip install pandas") from None
    rows = [row for path in records_files(paths) for row in read(path)]
    return pandas.DataFrame(rows, columns=list(FIELDS))


def select(rows: list[dict], metric: str, **where) -> list[dict]:
    return [
        r for r in rows if r["metric"] == metric and all(r.get(k) == v for k, v in where.items())
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
