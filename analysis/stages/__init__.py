"""The registered measurements: every module of this package defines STAGE (see base.py),
except base.py and helpers whose names start with an underscore.

STAGES is discovered, not listed by hand, and sorted by each stage's `order`."""

from __future__ import annotations

import importlib
import pkgutil

from posleak.analysis.engine.numbers import Catalogue, Reported
from posleak.analysis.stages.base import RUN, Context, Section, Stage

# what the engine itself records, before any stage: the run's validation loss
ENGINE_METRICS = {"val_loss": RUN}
ENGINE_NUMBERS = (Reported("val_loss", "validation loss", unit="nats", fmt=".4f"),)


def _discover() -> tuple[Stage, ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):  # helpers start with _
            stage = importlib.import_module(f"{__name__}.{info.name}").STAGE
            stage.key = info.name
            found.append(stage)
    return tuple(sorted(found, key=lambda stage: stage.order))


STAGES = _discover()
NUMBERS = Catalogue([*ENGINE_NUMBERS, *(n for stage in STAGES for n in stage.numbers)])


def sites() -> dict:
    """metric -> site, over every stage (a metric declared twice is a bug)."""
    out: dict = dict(ENGINE_METRICS)
    for stage in STAGES:
        for metric, site in stage.metrics.items():
            if metric in out:
                raise RuntimeError(f"metric {metric!r} is declared by two stages")
            out[metric] = site
    return out


def chosen(opts) -> list[Stage]:
    """The stages an analysis with these options runs, in order: those that apply, and of
    them only the ones Options.stages names (all when it names none) with what they need."""
    wanted = set(opts.stages or (s.key for s in STAGES))
    for s in reversed(STAGES):  # a stage needs only earlier ones
        if s.key in wanted:
            wanted.update(s.needs)
    return [s for s in STAGES if s.key in wanted and s.enabled(opts)]


def enabled(opts) -> list[str]:
    """The names of the stages an analysis with these options runs (its summary lists them,
    so that an analysis made before a stage existed, or with fewer stages, is not reused as if
    it had run them)."""
    return [s.name for s in chosen(opts)]


def keys() -> list[str]:
    """What --stages accepts."""
    return [s.key for s in STAGES]


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {[s.name for s in STAGES]}")


__all__ = [
    "NUMBERS",
    "STAGES",
    "Context",
    "Section",
    "Stage",
    "chosen",
    "enabled",
    "keys",
    "sites",
    "stage",
]
