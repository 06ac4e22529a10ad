"""Synthetic corpora whose token statistics carry no position signal.

Each corpus draws sequence n of a stream from counter-based randomness, so a sequence is a
pure function of (stream key, n). The corpus itself (a Markov chain's transition table)
comes from `corpus_seed`, fixed across training seeds so that seeds vary only the sample.
"""

from __future__ import annotations

import functools

import numpy as np

from posleak.data.counter_rng import random_below, random_uniform, stream_key
from posleak.data.tokenizer import Vocabulary

STRIDE = 1 << 24  # counters per sequence: sequences up to 16M tokens never share counters
CHUNK = 256  # Markov sequences sampled together


def _token_counters(index: np.ndarray, length: int) -> np.ndarray:
    return index[:, None].astype(np.uint64) * np.uint64(STRIDE) + np.arange(length, dtype=np.uint64)


class Uniform(Vocabulary):
    """I.i.d. uniform tokens: every position has exactly the same distribution."""

    name = "uniform"

    def sequences(self, key, index: np.ndarray, length: int) -> np.ndarray:
        return random_below(key, _token_counters(index, length), self.n_ordinary)


class Markov(Vocabulary):
    """A random order-k Markov chain, started from its stationary distribution.

    Each context of k tokens has its own next-token distribution drawn from a symmetric
    Dirichlet(concentration); small concentrations give peaked, predictable chains. Because
    the first k tokens are drawn from the stationary distribution over contexts, every
    position has the same marginal distribution: no position is special.
    """

    name = "markov"

    def __init__(self, n_ordinary: int, order: int, concentration: float, corpus_seed: int):
        super().__init__(n_ordinary)
        if order < 1 or n_ordinary**order > 1 << 20:
            raise ValueError(
                f"markov order {order} with {n_ordinary} tokens needs {n_ordinary}^{order} "
                "contexts; use order >= 1 and keep vocab^order <= 2^20"
            )
        if not concentration > 0:
            raise ValueError(f"markov concentration must be > 0, got {concentration}")
        self.order = order
        rng = np.random.default_rng(int(stream_key("markov", corpus_seed)))
        n_states = n_ordinary**order
        self.transitions = rng.dirichlet(np.full(n_ordinary, concentration), size=n_states)
        # row r of the cumulative table shifted by r: one sorted array, so that a single
        # searchsorted samples every sequence's next token at once
        self.shifted_cdf = (
            np.cumsum(self.transitions, axis=1) + np.arange(n_states)[:, None]
        ).ravel()
        self.stationary = self._stationary()
        self.state_cdf = np.cumsum(self.stationary)

    def _stationary(self, tol: float = 1e-13, max_iter: int = 100_000) -> np.ndarray:
        """Power iteration over contexts: state (a_1..a_k) -> (a_2..a_k, t)."""
        n, k = self.n_ordinary, self.order
        pi = np.full(n**k, 1.0 / n**k)
        for _ in range(max_iter):
            flow = (pi[:, None] * self.transitions).reshape(n, n ** (k - 1), n)
            nxt = flow.sum(axis=0).reshape(-1)  # oldest token forgotten
            if np.abs(nxt - pi).sum() < tol:
                return nxt
            pi = nxt
        raise RuntimeError("Markov chain did not reach its stationary distribution")

    def token_marginal(self) -> np.ndarray:
        """Stationary probability of each token (the distribution at every position)."""
        n = self.n_ordinary
        return self.stationary.reshape(n ** (self.order - 1), n).sum(axis=0)

    def entropy_rate(self) -> float:
        """Nats per token of the best possible predictor (knowing the chain): the loss floor."""
        p = self.transitions
        logs = np.log(np.where(p > 0, p, 1.0))
        return float(-(self.stationary[:, None] * p * logs).sum())

    def unigram_entropy(self) -> float:
        """Nats per token of predicting from token frequencies alone."""
        u = self.token_marginal()
        return float(-(u * np.log(np.where(u > 0, u, 1.0))).sum())

    def sequences(self, key, index: np.ndarray, length: int) -> np.ndarray:
        """Sampling is a loop over time, so it runs on whole chunks of CHUNK sequences (each
        row still a pure function of its own index) and keeps the last chunks: consecutive
        small batches then share one pass."""
        chunks = index // CHUNK
        out = np.empty((len(index), length), dtype=np.int64)
        for chunk in np.unique(chunks):
            rows = chunks == chunk
            out[rows] = self._chunk(key, int(chunk), length)[index[rows] - chunk * CHUNK]
        return out

    @functools.lru_cache(maxsize=4)  # noqa: B019 (sources live as long as the process)
    def _chunk(self, key, chunk: int, length: int) -> np.ndarray:
        return self._sample(key, np.arange(chunk * CHUNK, (chunk + 1) * CHUNK), length)

    def _sample(self, key, index: np.ndarray, length: int) -> np.ndarray:
        n, k = self.n_ordinary, self.order
        u = random_uniform(key, _token_counters(index, length + 1))  # (B, length + 1)
        state = np.minimum(np.searchsorted(self.state_cdf, u[:, 0], side="right"), n**k - 1)
        out = np.empty((len(index), max(length, k)), dtype=np.int64)
        for p in range(k):  # digits of the initial context, oldest first
            out[:, p] = state // n ** (k - 1 - p) % n
        for t in range(k, length):
            flat = np.searchsorted(self.shifted_cdf, state + u[:, t - k + 1], side="right")
            nxt = np.minimum(flat - state * n, n - 1)
            out[:, t] = nxt
            state = state % n ** (k - 1) * n + nxt
        return out[:, :length]


class Induction(Vocabulary):
    """Uniform tokens in which random segments reappear later in the same sequence.

    Each sequence gets `copies` segments of `segment_len` tokens copied from an earlier
    place to a later one, which rewards induction (copy) heads. Copying uniform tokens keeps
    every position's marginal uniform; which positions can hold a copy does depend on
    position (a copy comes after its source), as it does in real text.
    """

    name = "induction"

    def __init__(self, n_ordinary: int, segment_len: int, copies: int):
        super().__init__(n_ordinary)
        if segment_len < 1 or copies < 0:
            raise ValueError("induction needs segment_len >= 1 and copies >= 0")
        self.segment_len, self.copies = segment_len, copies

    def sequences(self, key, index: np.ndarray, length: int) -> np.ndarray:
        L = self.segment_len
        if length < 2 * L:
            raise ValueError(
                f"induction segments of {L} tokens need sequences of at least {2 * L} tokens, "
                f"got {length}; lower data.induction_segment or raise data.seq_len"
            )
        out = random_below(key, _token_counters(index, length), self.n_ordinary)
        rows = np.arange(len(index))[:, None]
        offsets = np.arange(L)
        for c in range(self.copies):
            counters = index.astype(np.uint64) * np.uint64(8) + np.uint64(c)
            dst = L + random_below(stream_key(key, "dst"), counters, length - 2 * L + 1)
            src = random_below(stream_key(key, "src"), counters, dst - L + 1)
            out[rows, dst[:, None] + offsets] = out[rows, src[:, None] + offsets]
        return out
