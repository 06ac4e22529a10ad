"""DataConfig, the source registry and batch streams.

A batch is a pure function of (seed, split, step, rank, world size): the same arguments
give the same tokens, ranks get disjoint sequences, and the validation stream is separate
from the training stream. Exact resume and distributed training need no data state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cache

import numpy as np
import torch

from posleak.data.counter_rng import stream_key
from posleak.data.mixture import Mixture
from posleak.data.synthetic import Backcopy, Induction, Markov, Uniform
from posleak.data.text import (
    HF_PARAMS,
    TextCorpus,
    bible_documents,
    file_documents,
    hf_documents,
    parse_hf,
)

SYNTHETIC = ("uniform", "markov", "induction", "backcopy")
BOS_POLICIES = ("always", "never")
ALIGNS = ("random", "document")


MARKOV_LOG2_STATES = 20  # a Markov chain's contexts, vocab^order, at most 2^20
SOURCE_PARAMS = {  # each source's own parameters ([data.params]), declared by its class
    "markov": Markov.params,
    "induction": Induction.params,
    "backcopy": Backcopy.params,
    "mixture": Mixture.params,
    "hf": HF_PARAMS,
}


@dataclass(frozen=True)
class DataConfig:
    # bible | uniform | markov | induction | backcopy | mixture | hf:NAME[:CONFIG] | a file
    source: str = "bible"
    seq_len: int = 128  # tokens the model sees per sequence (BOS included)
    bos: str = "always"  # always: position 0 holds BOS; never: an ordinary token
    align: str = "random"  # random offsets, or starts aligned to document starts (text)
    vocab_size: int = 67  # synthetic sources: total vocabulary, 3 specials included
    corpus_seed: int = 0  # fixes the synthetic corpus (e.g. the Markov table) across seeds
    val_fraction: float = 0.05
    cache_dir: str = ""  # tokenized-text cache; empty = $POSLEAK_CACHE or ~/.cache/posleak
    params: dict = field(default_factory=dict, hash=False)  # the source's own ([data.params])

    @property
    def kind(self) -> str:
        """The source's kind: its name, or "hf" for hf:NAME (a file or folder: its path)."""
        return "hf" if self.source.startswith("hf:") else self.source

    def param(self, name: str):
        """One of the source's own parameters: as given, or its default."""
        return self.params.get(name, SOURCE_PARAMS[self.kind][name])

    def built(self) -> DataConfig:
        """The config as a run holds it: the source's own parameters, each given or at its
        default; another source's (a base config shared by variants may set them) dropped."""
        own = SOURCE_PARAMS.get(self.kind, {})
        return replace(self, params={n: self.params.get(n, d) for n, d in own.items()})

    def problems(self) -> list[str]:
        out = self.param_problems()
        if out:
            return out
        if not self.source.strip():
            out.append(
                "data.source is empty (it would read the current folder as a corpus); name "
                "bible, uniform, markov, induction, backcopy, hf:NAME or a file or folder"
            )
        if self.bos not in BOS_POLICIES:
            out.append(f"data.bos must be one of {BOS_POLICIES}, got {self.bos!r}")
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
        return out + self.source_problems()

    def param_problems(self) -> list[str]:
        """Parameters no source has, or of another type than their default's."""
        if not isinstance(self.params, dict):
            return [f"data.params must be a table of the source's parameters, got {self.params!r}"]
        declared = {n: d for own in SOURCE_PARAMS.values() for n, d in own.items()}
        out = []
        for name, value in self.params.items():
            if name not in declared:
                out.append(f"data.params.{name} is not a parameter of any source (the sources' "
                           f"parameters: {', '.join(sorted(declared))})")  # fmt: skip
                continue
            default = declared[name]
            numeric = isinstance(default, float) and type(value) in (int, float)
            if not (numeric or type(value) is type(default)):
                out.append(f"data.params.{name} must be a {type(default).__name__}, got {value!r}")
        return out

    def source_problems(self) -> list[str]:
        """The ranges of the source's own parameters (another source's are not read)."""
        out = []
        if self.kind == "mixture" and not 0 <= self.param("mixture_share") <= 1:
            out.append(f"data.params.mixture_share must be in [0, 1], got "
                       f"{self.param('mixture_share')}")  # fmt: skip
        if self.kind == "markov":
            order, concentration = self.param("markov_order"), self.param("markov_concentration")
            if not (math.isfinite(concentration) and concentration > 0):
                out.append(
                    f"data.params.markov_concentration must be finite and > 0, got {concentration}"
                )
            if order < 1:
                out.append(f"data.params.markov_order must be >= 1, got {order}")
            elif order * math.log2(max(self.vocab_size - 3, 2)) > MARKOV_LOG2_STATES:
                # compared in logarithms: vocab ** order itself can be too large to compute
                out.append(
                    f"data.params.markov_order {order} needs (vocab_size - 3)^order contexts, "
                    f"more than 2^{MARKOV_LOG2_STATES}; lower it or data.vocab_size"
                )
        if self.kind == "induction":
            segment, copies = self.param("induction_segment"), self.param("induction_copies")
            if segment < 1 or copies < 0:
                out.append(
                    "data.params.induction_segment must be >= 1 and data.params.induction_copies "
                    f">= 0, got {segment} and {copies}"
                )
            elif copies * segment >= self.seq_len:
                out.append(
                    f"data.params.induction_copies x induction_segment must fit in data.seq_len "
                    f"({self.seq_len}), got {copies} x {segment}"
                )
        return out


@cache
def make_source(cfg: DataConfig):
    """The corpus named by cfg.source (cached: building a text corpus reads it once)."""
    src = cfg.source
    if src == "uniform":
        return Uniform(cfg.vocab_size - 3)
    if src == "markov":
        order, concentration = cfg.param("markov_order"), cfg.param("markov_concentration")
        return Markov(cfg.vocab_size - 3, order, concentration, cfg.corpus_seed)
    if src == "induction":
        segment, copies = cfg.param("induction_segment"), cfg.param("induction_copies")
        return Induction(cfg.vocab_size - 3, segment, copies)
    if src in ("backcopy", "mixture"):  # the bigram table comes from the built-in text's bytes
        text = "".join(bible_documents()).encode("utf-8")
        chain = Backcopy.from_text(text, cfg.vocab_size - 3, cfg.param("backcopy_triggers"))
        if src == "backcopy":
            return chain
        text_source = make_source(replace(cfg, source="bible"))
        return Mixture(text_source, chain, cfg.param("mixture_share"))
    if src == "bible":
        docs = bible_documents()
    elif src.startswith("hf:"):
        config, split, field_name = (cfg.param(n) for n in ("hf_config", "hf_split", "hf_field"))
        name, config = parse_hf(src, config)
        identity = f"hf:{name}:{config}:{split}:{field_name}"

        def stream():
            return hf_documents(name, config, split, field_name)

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
