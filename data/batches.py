"""DataConfig, the source registry and batch streams.

A batch is a pure function of (seed, split, step, rank, world size): the same arguments
give the same tokens, ranks get disjoint sequences, and the validation stream is separate
from the training stream. Exact resume and distributed training need no data state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch

from posleak.data.counter_rng import stream_key
from posleak.data.mixture import Mixture
from posleak.data.synthetic import Backcopy, Induction, Markov, Uniform
from posleak.data.text import TextCorpus, bible_documents, file_documents, hf_documents, parse_hf

SYNTHETIC = ("uniform", "markov", "induction", "backcopy")
BOS_POLICIES = ("always", "never")
ALIGNS = ("random", "document")


MARKOV_LOG2_STATES = 20  # a Markov chain's contexts, vocab^order, at most 2^20


@dataclass(frozen=True)
class DataConfig:
    # bible | uniform | markov | induction | backcopy | mixture | hf:NAME[:CONFIG] | a file
    source: str = "bible"
    seq_len: int = 128  # tokens the model sees per sequence (BOS included)
    bos: str = "always"  # always: position 0 holds BOS; never: an ordinary token
    align: str = "random"  # random offsets, or starts aligned to document starts (text)
    vocab_size: int = 67  # synthetic sources: total vocabulary, 3 specials included
    markov_order: int = 1
    markov_concentration: float = 0.1
    induction_segment: int = 8
    induction_copies: int = 2
    backcopy_triggers: str = "eth"  # backcopy: the trigger characters (their number = length)
    mixture_share: float = 0.5  # mixture: the share of Backcopy sequences among KJV crops
    corpus_seed: int = 0  # fixes the synthetic corpus (e.g. the Markov table) across seeds
    val_fraction: float = 0.05
    hf_config: str = ""  # dataset configuration (or hf:NAME:CONFIG)
    hf_split: str = "train"
    hf_field: str = "text"
    cache_dir: str = ""  # tokenized-text cache; empty = $POSLEAK_CACHE or ~/.cache/posleak

    def problems(self) -> list[str]:
        out = []
        if not self.source.strip():
            out.append(
                "data.source is empty (it would read the current folder as a corpus); name "
                "bible, uniform, markov, induction, backcopy, hf:NAME or a file or folder"
            )
        if self.bos not in BOS_POLICIES:
            out.append(f"data.bos must be one of {BOS_POLICIES}, got {self.bos!r}")
        if not 0 <= self.mixture_share <= 1:
            out.append(f"data.mixture_share must be in [0, 1], got {self.mixture_share}")
        if self.align not in ALIGNS:
            out.append(f"data.align must be one of {ALIGNS}, got {self.align!r}")
        if not 2 <= self.seq_len <= 1 << 20:
            out.append(f"data.seq_len must be in [2, 2^20], got {self.seq_len}")
        if not 0 < self.val_fraction < 1:
            out.append(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.vocab_size < 5:
            out.append(
                f"data.vocab_size must be >= 5 (2 tokens + 3 specials), got {self.vocab_size}"
            )
        if not (math.isfinite(self.markov_concentration) and self.markov_concentration > 0):
            out.append(
                f"data.markov_concentration must be finite and > 0, got {self.markov_concentration}"
            )
        if self.markov_order < 1 or self.induction_segment < 1 or self.induction_copies < 0:
            out.append(
                "data.markov_order and data.induction_segment must be >= 1, "
                "data.induction_copies >= 0"
            )
        elif self.markov_order * math.log2(max(self.vocab_size - 3, 2)) > MARKOV_LOG2_STATES:
            # compared in logarithms: vocab ** order itself can be too large to compute
            out.append(
                f"data.markov_order {self.markov_order} needs (vocab_size - 3)^order contexts, "
                f"more than 2^{MARKOV_LOG2_STATES}; lower data.markov_order or data.vocab_size"
            )
        if (
            self.source == "induction"
            and self.induction_copies * self.induction_segment >= self.seq_len
        ):
            out.append(
                f"data.induction_copies x data.induction_segment must fit in data.seq_len "
                f"({self.seq_len}), got {self.induction_copies} x {self.induction_segment}"
            )
        return out


@cache
def make_source(cfg: DataConfig):
    """The corpus named by cfg.source (cached: building a text corpus reads it once)."""
    src = cfg.source
    if src == "uniform":
        return Uniform(cfg.vocab_size - 3)
    if src == "markov":
        return Markov(
            cfg.vocab_size - 3, cfg.markov_order, cfg.markov_concentration, cfg.corpus_seed
        )
    if src == "induction":
        return Induction(cfg.vocab_size - 3, cfg.induction_segment, cfg.induction_copies)
    if src in ("backcopy", "mixture"):  # the bigram table comes from the built-in text's bytes
        text = "".join(bible_documents()).encode("utf-8")
        chain = Backcopy.from_text(text, cfg.vocab_size - 3, cfg.backcopy_triggers)
        if src == "backcopy":
            return chain
        return Mixture(make_source(replace(cfg, source="bible")), chain, cfg.mixture_share)
    if src == "bible":
        docs = bible_documents()
    elif src.startswith("hf:"):
        name, config = parse_hf(src, cfg.hf_config)
        identity = f"hf:{name}:{config}:{cfg.hf_split}:{cfg.hf_field}"

        def stream():
            return hf_documents(name, config, cfg.hf_split, cfg.hf_field)

        return TextCorpus(src, stream, cfg.val_fraction, cfg.cache_dir or None, identity)
    else:
        docs = file_documents(src)
    return TextCorpus(src, docs, cfg.val_fraction, cfg.cache_dir or None)


def vocab_size_of(cfg: DataConfig) -> int:
    return make_source(cfg).size


class BatchStream:
    """Token batches (B, seq_len + 1): inputs are [:, :-1], next-token targets [:, 1:]."""

    def __init__(
        self, cfg: DataConfig, seed: int, split: str, batch_size: int, stream: str = "batches"
    ):
        """`stream` names an independent sequence of batches over the same split."""
        self.cfg, self.split, self.batch_size = cfg, split, batch_size
        self.source = make_source(cfg)
        self.key = stream_key(stream, seed, split)

    def sequences(self, index: np.ndarray) -> np.ndarray:
        """Sequence number `index` of this stream, for each index: (len(index), seq_len + 1)."""
        n_body = self.cfg.seq_len + (0 if self.cfg.bos == "always" else 1)
        if isinstance(self.source, (TextCorpus, Mixture)):
            body = self.source.sequences(self.key, index, n_body, self.split, self.cfg.align)
        else:
            body = self.source.sequences(self.key, index, n_body)
        if self.cfg.bos == "always":
            body = np.concatenate([np.full((len(index), 1), self.source.bos), body], axis=1)
        return body

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if self.batch_size % world_size:
            raise ValueError(
                f"batch size {self.batch_size} is not divisible by world size {world_size}; "
                "set train.batch_size to a multiple of the number of processes"
            )
        local = self.batch_size // world_size
        first = step * self.batch_size + rank * local
        index = np.arange(first, first + local, dtype=np.int64)
        return torch.from_numpy(self.sequences(index))
