"""KJV crops and Bigram-Backcopy sequences in one stream (`data.source = "mixture"`).

Sinks form within a few hundred steps on Bigram-Backcopy, where a copying head has nothing to
do at most queries, and not on text at this project's scale. Mixing the two, in one byte
vocabulary, asks whether a sink learnt on the copy sequences also appears on the text ones
(read with `posleak analyze RUN --data bible`, text only). A Backcopy token is the byte it
stands for (its alphabet is the text's commonest bytes, the triggers are characters), so
both kinds of sequence are byte strings of one tokenizer, with one BOS.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from posleak.data.counter_rng import random_uniform, stream_key
from posleak.data.synthetic import Backcopy
from posleak.data.text import TextCorpus


class Mixture:
    """Each sequence is Backcopy with probability `share`, else a text crop; which one is
    a pure function of (stream key, sequence index), as every draw in posleak is."""

    params: ClassVar[dict] = {**Backcopy.params, "mixture_share": 0.5}  # share: of Backcopy

    def __init__(self, text: TextCorpus, backcopy: Backcopy, share: float):
        self.text, self.backcopy, self.share = text, backcopy, share
        self.bos, self.eos, self.size = text.bos, text.eos, text.size
        self.byte_of = np.frombuffer(backcopy.alphabet, dtype=np.uint8).astype(np.int64)

    def is_copy_sequence(self, key, index: np.ndarray) -> np.ndarray:
        """True for the sequences of `index` that are Backcopy."""
        return random_uniform(stream_key("mixture", int(key)), index) < self.share

    def sequences(self, key, index: np.ndarray, length: int, split: str, align: str):
        index = np.asarray(index, dtype=np.int64)
        copy = self.is_copy_sequence(key, index)
        out = np.empty((len(index), length), dtype=np.int64)
        text_key, copy_key = (stream_key(part, int(key)) for part in ("text", "backcopy"))
        if (~copy).any():
            out[~copy] = self.text.sequences(text_key, index[~copy], length, split, align)
        if copy.any():
            out[copy] = self.byte_of[self.backcopy.sequences(copy_key, index[copy], length)]
        return out
