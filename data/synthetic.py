"""Synthetic corpora whose token statistics carry no position signal.

Each corpus draws sequence n of a stream from counter-based randomness, so a sequence is a
pure function of (stream key, n). The corpus itself (a Markov chain's transition table)
comes from `corpus_seed`, fixed across training seeds so that seeds vary only the sample.
"""

from __future__ import annotations

import functools
from typing import ClassVar

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


class ChunkedChain(Vocabulary):
    """A chain sampled by a loop over time, so it runs on whole chunks of CHUNK sequences
    (each row still a pure function of its own index) and keeps the last chunks: consecutive
    small batches then share one pass. Subclasses define _sample(key, index, length)."""

    def sequences(self, key, index: np.ndarray, length: int) -> np.ndarray:
        chunks = index // CHUNK
        out = np.empty((len(index), length), dtype=np.int64)
        for chunk in np.unique(chunks):
            rows = chunks == chunk
            out[rows] = self._chunk(key, int(chunk), length)[index[rows] - chunk * CHUNK]
        return out

    @functools.lru_cache(maxsize=4)  # noqa: B019 (sources live as long as the process)
    def _chunk(self, key, chunk: int, length: int) -> np.ndarray:
        return self._sample(key, np.arange(chunk * CHUNK, (chunk + 1) * CHUNK), length)


class Markov(ChunkedChain):
    """A random order-k Markov chain, started from its stationary distribution.

    Each context of k tokens has its own next-token distribution drawn from a symmetric
    Dirichlet(concentration); small concentrations give peaked, predictable chains. Because
    the first k tokens are drawn from the stationary distribution over contexts, every
    position has the same marginal distribution: no position is special.
    """

    name = "markov"
    params: ClassVar[dict] = {"markov_order": 1, "markov_concentration": 0.1}  # [data.params]

    def __init__(self, n_ordinary: int, order: int, concentration: float, corpus_seed: int):
        super().__init__(n_ordinary)
        if order < 1 or order > 20 or n_ordinary**order > 1 << 20:  # order first: no 64^(2^62)
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
    params: ClassVar[dict] = {"induction_segment": 8, "induction_copies": 2}  # [data.params]

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


def bigram_counts(text: bytes, n_ordinary: int) -> tuple[bytes, np.ndarray]:
    """The n_ordinary most frequent bytes of text (ties by byte value) and the counts of
    consecutive pairs among them, other bytes dropped first: (alphabet, counts[n, n])."""
    raw = np.frombuffer(text, dtype=np.uint8)
    freq = np.bincount(raw, minlength=256)
    order = np.lexsort((np.arange(256), -freq))  # most frequent first, then by byte value
    alphabet = order[:n_ordinary][freq[order[:n_ordinary]] > 0]
    if len(alphabet) < n_ordinary:
        raise ValueError(
            f"the text has only {len(alphabet)} distinct bytes, fewer than the "
            f"{n_ordinary} ordinary tokens asked for; lower data.vocab_size to "
            f"{len(alphabet) + 3} or less"
        )
    index = np.full(256, -1)
    index[alphabet] = np.arange(n_ordinary)
    kept = index[raw]
    kept = kept[kept >= 0]
    counts = np.bincount(kept[:-1] * n_ordinary + kept[1:], minlength=n_ordinary**2)
    return bytes(alphabet.astype(np.uint8)), counts.reshape(n_ordinary, n_ordinary)


class Backcopy(ChunkedChain):
    """Bigram-Backcopy (Guo et al. 2024): a first-order chain broken by trigger tokens.

    Tokens follow a bigram transition table, except that the token after a trigger copies
    the token just before the trigger. The table is estimated from real text, so that the
    bigram part is text-like; the copy part rewards a head that finds the token two back,
    and on other queries that head has nothing to do: the setting where attention sinks
    form within a few hundred steps. The first token is never a trigger, so every copy's
    source is in the context.
    """

    name = "backcopy"
    params: ClassVar[dict] = {"backcopy_triggers": "eth"}  # the trigger characters (their count)

    def __init__(self, transitions: np.ndarray, triggers, alphabet: bytes = b""):
        p = np.asarray(transitions, dtype=np.float64)
        n = p.shape[0]
        super().__init__(n)
        triggers = np.unique(np.asarray(triggers, dtype=np.int64))
        if p.shape != (n, n) or not np.allclose(p.sum(axis=1), 1) or (p < 0).any():
            raise ValueError("backcopy transitions must be a square row-stochastic matrix")
        if len(triggers) == 0 or len(triggers) >= n or triggers.min() < 0 or triggers.max() >= n:
            raise ValueError(f"backcopy needs 1 to {n - 1} trigger tokens among 0..{n - 1}")
        self.transitions, self.alphabet = p, alphabet
        self.is_trigger = np.zeros(n, dtype=bool)
        self.is_trigger[triggers] = True
        self.triggers = triggers
        self.shifted_cdf = (np.cumsum(p, axis=1) + np.arange(n)[:, None]).ravel()
        start = np.where(self.is_trigger, 0.0, self._bigram_stationary())
        self.start = start / start.sum()  # the first token: never a trigger
        self.start_cdf = np.cumsum(self.start)
        self.start_cdf[-1] = 1.0
        self.pair_stationary = self._pair_stationary()

    @classmethod
    def from_text(cls, text: bytes, n_ordinary: int, trigger_chars: str) -> Backcopy:
        """The table estimated from text's bigram counts over its n_ordinary commonest bytes;
        triggers given as characters of that alphabet. A byte never followed by a kept byte
        (possible only for the text's last one) gets a uniform row."""
        alphabet, counts = bigram_counts(text, n_ordinary)
        wanted = trigger_chars.encode("utf-8")
        missing = sorted({chr(b) for b in wanted if b not in alphabet})
        if missing or not wanted:
            raise ValueError(
                f"data.backcopy_triggers must name characters of the {n_ordinary} commonest "
                f"bytes of the text; {missing or 'none given'} are not among them"
            )
        rows = counts.sum(axis=1, keepdims=True)
        p = np.where(rows > 0, counts / np.maximum(rows, 1), 1.0 / n_ordinary)
        return cls(p, [alphabet.index(b) for b in wanted], alphabet)

    def _bigram_stationary(self, tol: float = 1e-14, max_iter: int = 200_000) -> np.ndarray:
        pi = np.full(self.n_ordinary, 1.0 / self.n_ordinary)
        for _ in range(max_iter):
            nxt = 0.5 * (pi + pi @ self.transitions)  # lazy: no periodicity
            if np.abs(nxt - pi).sum() < tol:
                return nxt
            pi = nxt
        raise RuntimeError("the backcopy bigram chain did not reach a stationary distribution")

    def _pair_stationary(self, tol: float = 1e-14, max_iter: int = 200_000) -> np.ndarray:
        """Long-run distribution of (previous token, token): the process is Markov in pairs,
        (a, b) -> (b, a) when b is a trigger, else (b, c) with probability P[b, c]. Iterated
        from the real first pair, so that closed classes the process never enters (a
        trigger copying itself forever) get no mass."""
        trig = self.is_trigger
        pi = self.start[:, None] * self.transitions
        for _ in range(max_iter):
            into = pi.sum(axis=0)  # mass whose current token is b
            nxt = np.where(trig[:, None], 0.0, into[:, None] * self.transitions)
            nxt[trig, :] += pi[:, trig].T  # copies: (a, b) -> (b, a)
            if np.abs(nxt - pi).sum() < tol:
                return nxt
            pi = 0.5 * (pi + nxt)  # lazy step: the same fixed point, and no periodicity
        raise RuntimeError("the backcopy chain did not reach its stationary distribution")

    def copy_fraction(self) -> float:
        """Long-run share of tokens that are copies (they follow a trigger)."""
        return float(self.pair_stationary[:, self.is_trigger].sum())

    def bigram_floor(self) -> float:
        """Nats per token of the best predictor on non-copy tokens (the loss floor there)."""
        p = self.transitions
        row_entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
        mass = np.where(self.is_trigger, 0.0, self.pair_stationary.sum(axis=0))
        return float((mass * row_entropy).sum() / mass.sum())

    def copy_floor(self) -> float:
        """A copy is fixed by its context, so its floor is 0 nats."""
        return 0.0

    def entropy_rate(self) -> float:
        """Nats per token over all tokens in the long run."""
        return (1 - self.copy_fraction()) * self.bigram_floor()

    def copy_targets(self, tokens) -> np.ndarray:
        """For token rows (B, L), True at column t when tokens[:, t] is a copy (the token at
        t - 1 is a trigger); as next-token targets, a model's query t - 1 predicts it."""
        tokens = np.asarray(tokens)
        out = np.zeros(tokens.shape, dtype=bool)
        prev = tokens[:, :-1]
        ordinary = prev < self.n_ordinary  # specials (BOS) are never triggers
        out[:, 1:] = ordinary & self.is_trigger[np.where(ordinary, prev, 0)]
        return out

    def _sample(self, key, index: np.ndarray, length: int) -> np.ndarray:
        n = self.n_ordinary
        u = random_uniform(key, _token_counters(index, length))
        out = np.empty((len(index), max(length, 1)), dtype=np.int64)
        out[:, 0] = np.minimum(np.searchsorted(self.start_cdf, u[:, 0], side="right"), n - 1)
        for t in range(1, length):
            prev = out[:, t - 1]
            flat = np.searchsorted(self.shifted_cdf, prev + u[:, t], side="right")
            drawn = np.minimum(flat - prev * n, n - 1)
            out[:, t] = np.where(self.is_trigger[prev], out[:, t - 2] if t >= 2 else drawn, drawn)
        return out[:, :length]
