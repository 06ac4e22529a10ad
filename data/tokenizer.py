"""Byte-level tokenizer: ids 0-255 are bytes, then the specials BOS, EOS, PAD."""

from __future__ import annotations

import numpy as np

N_SPECIALS = 3


class Vocabulary:
    """n ordinary tokens 0..n-1 followed by the specials BOS = n, EOS = n + 1, PAD = n + 2."""

    def __init__(self, n_ordinary: int):
        if n_ordinary < 2:
            raise ValueError(
                f"a vocabulary needs at least 2 ordinary tokens besides the {N_SPECIALS} specials "
                f"(BOS, EOS, PAD); got vocab_size={n_ordinary + N_SPECIALS}, "
                f"use vocab_size >= {2 + N_SPECIALS}"
            )
        self.n_ordinary = n_ordinary
        self.bos, self.eos, self.pad = n_ordinary, n_ordinary + 1, n_ordinary + 2
        self.size = n_ordinary + N_SPECIALS


class ByteTokenizer(Vocabulary):
    """UTF-8 bytes as tokens: BOS = 256, EOS = 257, PAD = 258, vocabulary size 259."""

    def __init__(self):
        super().__init__(256)

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids of text (encoded as UTF-8) or of raw bytes, taken as they are."""
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Bytes back to text; specials are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
