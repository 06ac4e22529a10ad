"""What a measurement declares: the metrics it writes (with their site), the numbers it reports
(analysis/engine/numbers.py), its per-layer curves, its figures and its report section.

The engine (analysis/engine/analyze.py) runs the stages in `order` after one shared base pass;
summaries (analysis/engine/summary.py), comparisons (analysis/reports/compare.py) and the
records' sites loop over them, so a new measurement is one module here, its test and its
entry in docs/science.md.
Labels are formatted from the Options the analysis was made with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from posleak.analysis.engine.options import Options

if TYPE_CHECKING:  # the engine imports the stages: these names are for annotations only
    from posleak.analysis.engine.analyze import Pass
    from posleak.analysis.engine.collect import Subject
    from posleak.analysis.engine.records import Recorder
    from posleak.analysis.maths.measures import TwoWayDesign

RESID, ATTN, RUN = "resid", "attn", None  # what a record's `layer` counts


class Bench(Protocol):
    """What a stage may read of the analysis it runs in: the whole contract. The engine's
    Analysis provides it; tests/test_stage_contract.py fails when a stage reads anything
    else. What stages share beyond it goes through the Context."""

    opts: Options  # the options the analysis was made with
    rec: Recorder  # rec.add(metric, value, layer=..., condition={...}): the records
    model: torch.nn.Module  # the hooked model: cfg, and hook names (model/hooks.py)
    subject: Subject  # what is analysed: seed, bos_policies, copy_targets, name
    T: int  # tokens per analysed sequence
    L: int  # attention layers
    H: int  # heads per layer
    windows: tuple  # per layer: its window w, or None for full attention
    window: int | None  # the smallest window of any layer (None: none)
    resid_names: list[str]  # the residual sites' hook names: embeddings, then each layer out
    positions: torch.Tensor  # the query positions a probe reads
    batch: int  # sequences per forward pass
    boot_a: torch.Tensor  # bootstrap weights of half A's blocks
    boot_b: torch.Tensor  # ... and of half B's

    def tokens(self, n: int, seq_len: int, stream_name: str, bos: str | None = None):
        """(n, seq_len + 1) held-out tokens from their own named stream."""

    def measure(self, tokens, interventions=(), fitted=None, targets=None) -> Pass:
        """One pass with the given hooks: logit sums, probe statistics, losses."""

    def design(self, layer: int) -> TwoWayDesign:
        """The two-way fit's design of an attention layer."""

    def halves(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence indices of half A and half B."""

    def set_rope_scale(self, scale: float) -> None:
        """NTK at inference (RoPE models only)."""


@dataclass
class Context:
    """What the stages of one analysis share: the analysed tokens, the base pass over them
    (analysis/engine/analyze.py: Pass, with the loss of every position), the tokens' next-token
    targets, once the probe stage has run its fitted probes, and the per-position losses of
    intervened passes by label, for a later stage to reuse rather than run the pass again."""

    tokens: torch.Tensor
    base: object
    targets: torch.Tensor
    fitted: list | None = None
    losses: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    """A report section: its title and the figure keys it shows."""

    title: str
    figures: tuple[str, ...]


@dataclass
class Stage:
    """One measurement. Subclasses override what they provide; the defaults provide nothing."""

    name: str  # in timings and progress
    order: int  # stages run, and report, in this order
    metrics: dict = field(default_factory=dict)  # metric -> site (RESID, ATTN or RUN)
    numbers: tuple = ()  # the Reported numbers it measures, one per run each (per condition)
    needs: tuple = ()  # the keys of stages whose results it reads (they run first)
    key: str = ""  # its module's name: what --stages names (set on discovery)
    title: str = ""  # a report's heading over its sections, where it has several

    def enabled(self, opts: Options) -> bool:
        return True

    def run(self, analysis: Bench, ctx: Context) -> None:
        """Measure, and record rows through analysis.rec.add."""

    def work(self, analysis: Bench) -> int:
        """About how many tokens run() gives the model (for progress and ETA; 0 when it
        reads only the base pass)."""
        return 0

    def per_layer(self, rows: list[dict], opts: Options) -> dict:
        """{curve name: {layer: value}} for analysis.json and the per-run report."""
        return {}

    def figures(self, groups: dict, out: Path, opts: Options) -> dict:
        """{figure key: PNG file name} of the comparison report."""
        return {}

    def sections(self, opts: Options) -> list[Section]:
        return []
