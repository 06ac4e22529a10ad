"""Counter-based random numbers: a value is a pure function of (key, counter).

This is what makes every batch a pure function of (seed, step, rank): no generator state
to save, replay or skip, and any slice of the stream can be drawn directly.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def stream_key(*parts) -> np.uint64:
    """A 64-bit key for a named stream, e.g. stream_key(seed, "train")."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def random_u64(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    """SplitMix64 output number `counter` of the stream that starts at `key`."""
    with np.errstate(over="ignore"):
        z = np.asarray(counters, dtype=np.uint64) * _GOLDEN + key
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def random_uniform(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) with 53 random bits."""
    return (random_u64(key, counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_below(key: np.uint64, counters: np.ndarray, high) -> np.ndarray:
    """Integers uniform in [0, high) (high may be an array); bias below 2^-40 for high < 2^24."""
    return (random_uniform(key, counters) * np.asarray(high)).astype(np.int64)
