"""The registered measurements: every module of this package defines STAGE (see base.py),
except base.py and helpers whose names start with an underscore.

STAGES is discovered, not listed by hand, and sorted by each stage's `order`."""

from __future__ import annotations

import importlib
import pkgutil

from posleak.analysis.stages.base import Context, Section, Stage


def _discover() -> tuple[Stage, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):  # helpers start with _
            found.append(importlib.import_module(f"{__name__}.{info.name}").STAGE)
    return tuple(sorted(found, key=lambda stage: stage.order))


STAGES = _discover()


def sites() -> dict:
    """metric -> site, over every stage (a metric declared twice is a bug)."""
    out: dict = {}
    for stage in STAGES:
        for metric, site in stage.metrics.items():
            if metric in out:
                raise RuntimeError(f"metric {metric!r} is declared by two stages")
            out[metric] = site
    return out


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {[s.name for s in STAGES]}")


__all__ = ["STAGES", "Context", "Section", "Stage", "sites", "stage"]
