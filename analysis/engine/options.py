"""Options: every choice of the analysis that the definitions leave to us, with its default.

The command line's defaults are these (posleak/cli.py reads them), the stages read them, and
the reports format their labels from them, so changing one changes every place it shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Options:
    """Every choice of the analysis that the definitions leave to us, with its default."""

    seqs: int = 256
    step: int | None = None  # checkpoint to analyse; default: the newest that verifies
    seq_len: int | None = None  # default: the run's training length
    rope_scale: float | None = None  # NTK scaling applied at inference (composes with trained)
    data: str | None = None  # default: the run's data source (a pretrained model: bible)
    bos: str | None = None  # BOS policy of the sequences; default: the run's, or the tokenizer's
    device: str = "cpu"
    dtype: str = "float32"  # a pretrained model's weights; a posleak run is analysed in float32
    sink_eps: float = 0.3  # a head is a sink head when alpha_0 > sink_eps (Gu et al.'s convention)
    sink_lift: float = 5.0  # ... and, in version 3, when its key-0 lift lambda_0 >= sink_lift
    signature_seqs: int = 32  # sequences for the sink signatures (massive activation, drain)
    probe_min_pos: int = 1  # probe positions >= this (0 holds BOS, identifiable by token)
    probe_folds: int = 5  # cross-validation folds (grouped by sequence) for the ridge strength
    early_queries: int = 16  # "early queries" are 1 <= i < this: the A_i0 profile of every head,
    # C_res at early queries and the headline share removed by a BOS replacement
    anchor_positions: tuple = (0, 4, 16)  # version 4's anchoring: BOS put at these positions
    anchor_seqs: int = 64  # sequences for the anchoring test
    fingerprint_seqs: int = 32
    fingerprint_query: int = 8  # query i at which a head's position-0 output is compared
    early_k: tuple = (8, 16, 32, 64)  # BOS replacement: removed share over queries i < k
    fit_queries: int = 64  # K_fit: version 3's early-query C_res comes from a two-way fit on
    # the queries i < K_fit only, so it does not depend on the analysed length
    contrast_window: int | None = None  # version 3, item 4: window-vs-full contrasts at
    # queries i >= w on the window's pairs; default w: the model's own window (a full-attention
    # model compared with a windowed one is analysed with the other's w)
    swaps: tuple = ("mean", "token", "random", "zeros")
    swap_family: tuple = ("mean",)  # those of `swaps` named here also get the key-only and
    # value-only swaps and the position control (three passes each)
    knockout: bool = True  # key-0 knockout in all layers at once
    knockout_per_layer: bool = False  # also one layer at a time (one more pass per layer)
    top_heads: int = 3  # per-head key-0 knockouts and route-2 tests for the top heads by lambda_0
    content_seqs: int = 32  # c_content's second pass reads the first this many sequences
    shift_seqs: int = 32  # sequences for the shift test (two passes of their own)
    blocks: int = 16  # sequence blocks (even): halves A/B and units of the bootstrap
    bootstrap: int = 200  # bootstrap replicates for intervals over sequences
    ntk_scales: tuple = ()  # version 3, item 9: NTK at inference at these s, on the same
    # sequences as the base pass, contrasted with it (RoPE models; e.g. (2, 4, 8))
    extrapolation: tuple = (1, 2, 4, 8)  # loss per position at these multiples of T_train
    extrapolation_seqs: int = 32
    batch_size: int = 32
    stages: tuple = ()  # the stages to run by key (analysis/stages/ module names); () = all,
    # and a stage's prerequisites run with it
    max_attention_elements: int = 1 << 25  # the batch shrinks so B*H*T*T stays below this
    layer_cache_mb: int = field(default=1024, compare=False)  # memory for every block's input
    # from the base pass, so that an intervention starts at the first block it changes (a
    # posleak run's; 0: never). It changes no number, so two analyses that differ only in it
    # are the same analysis

    def problems(self, train_len: int) -> list[str]:
        from posleak.model.positions import MAX_ROPE_SCALE  # torch: not for the command line's help

        out = []
        T = train_len if self.seq_len is None else self.seq_len
        if self.seqs < 4:
            out.append(f"--seqs must be at least 4 (two halves of two sequences), got {self.seqs}")
        if T < max(4, self.probe_min_pos + 3):
            out.append(f"--seq-len must be at least 4 for the probe and the fits, got {T}")
        if self.rope_scale is not None and not (1 <= self.rope_scale <= MAX_ROPE_SCALE):
            out.append(
                f"--rope-scale must be between 1 (none) and {MAX_ROPE_SCALE:g}, "
                f"got {self.rope_scale}"
            )
        if self.contrast_window is not None and not 1 <= self.contrast_window < T - 1:
            out.append(
                f"--contrast-window must be between 1 and the analysed length - 2 ({T - 2}), "
                f"got {self.contrast_window}"
            )
        if not all(1 < s <= MAX_ROPE_SCALE for s in self.ntk_scales):
            out.append(
                f"--ntk-scales must be > 1 (1 is the base pass) and at most {MAX_ROPE_SCALE:g}, "
                f"got {self.ntk_scales}"
            )
        from posleak.analysis.stages import keys  # the stages import these options

        if unknown := sorted(set(self.stages) - set(keys())):
            out.append(f"--stages: no stage {', '.join(unknown)}; stages: {', '.join(keys())}")
        if self.layer_cache_mb < 0:
            out.append(f"--layer-cache-mb must be 0 (none) or more, got {self.layer_cache_mb}")
        if self.bos not in (None, "always", "never"):
            out.append(f"--bos must be always or never, got {self.bos!r}")
        return out

    @classmethod
    def of_summary(cls, summary: dict) -> Options:
        """The options an analysis was made with (analysis.json's `options`; defaults for an
        older summary that has none)."""
        stored = summary.get("options")
        if stored is None:
            return cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        ran = set(summary.get("stages") or ())
        older = {name: value for name, (value, stage) in ADDED_LATER.items() if stage in ran}
        values = {**older, **stored}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
        )


# Options added after analyses were first stored: {option: (what an analysis that stored none
# of them did, the stage (by name) the option changes)}. An analysis that did not run that stage
# reads as made with the default, which changes nothing it holds.
ADDED_LATER = {"swap_family": ((), "BOS replacements")}
