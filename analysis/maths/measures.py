"""The measurements of docs/science.md (definitions version 3) as pure functions.

Shapes: logits (..., H, T, T) with any value on masked entries (they never enter a
statistic); visible (T, T) boolean mask; everything is computed in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DEFINITIONS = 4


# ------------------------------------------------------------------ the two-way fit
class TwoWayDesign(NamedTuple):
    """The least-squares problem M_ij ~ g(i - j) + a(i) over visible pairs, reduced to offsets.

    Logits are handled packed: one value per visible pair, in the order of `pairs`.
    Eliminating a(i) from the normal equations leaves a T x T system K g = b in the offsets
    alone (the Schur complement), so no design matrix of T^2/2 rows is ever built. K is
    singular along the constant vector (g + c, a - c fit equally well); its pseudo-inverse
    picks the minimum-norm g, and the residue does not depend on that choice.
    """

    visible: torch.Tensor  # (T, T) bool
    pairs: torch.Tensor  # (P,) flat index i * T + j of each visible pair
    query: torch.Tensor  # (P,) i of each pair
    offset: torch.Tensor  # (P,) i - j of each pair
    by_offset: torch.Tensor  # (T, T) float: 1 where query i sees offset delta
    rows: torch.Tensor  # (T,) visible keys per query, n_i
    k_pinv: torch.Tensor  # (T, T) pseudo-inverse of K


def two_way_design(visible: torch.Tensor) -> TwoWayDesign:
    T = visible.shape[0]
    pairs = visible.flatten().nonzero()[:, 0]
    query, key = pairs // T, pairs % T
    o = torch.zeros(T, T, dtype=torch.float64)
    o[query, query - key] = 1.0
    rows = o.sum(1).clamp(min=1)  # a query of a restricted pair set may see no key: divide by 1
    k = torch.diag(o.sum(0)) - o.T @ (o / rows[:, None])
    pinv = torch.linalg.pinv(k, hermitian=True)
    return TwoWayDesign(visible, pairs, query, query - key, o, rows, pinv)


def pack(m: torch.Tensor, design: TwoWayDesign) -> torch.Tensor:
    """(..., T, T) -> (..., P): the visible pairs."""
    return m.flatten(-2)[..., design.pairs]


def per_query(packed: torch.Tensor, design: TwoWayDesign) -> torch.Tensor:
    """Sum over each query's visible keys: (..., P) -> (..., T)."""
    out = packed.new_zeros(*packed.shape[:-1], len(design.rows))
    return out.index_add_(-1, design.query, packed)


class TwoWayFit(NamedTuple):
    g: torch.Tensor  # (..., T): g[delta]
    a: torch.Tensor  # (..., T): a[i]
    residue: torch.Tensor  # (..., P): M - g(i - j) - a(i) on the visible pairs


def two_way_fit(m: torch.Tensor, design: TwoWayDesign) -> TwoWayFit:
    """Least-squares fit of packed mean logits M (..., P) by g(i - j) + a(i)."""
    m = m.double()
    row_mean = per_query(m, design) / design.rows
    centred = m - row_mean[..., design.query]
    b = centred.new_zeros(*m.shape[:-1], len(design.rows)).index_add_(-1, design.offset, centred)
    g = b @ design.k_pinv  # k_pinv is symmetric
    a = row_mean - (g @ design.by_offset.T) / design.rows
    return TwoWayFit(g, a, m - g[..., design.offset] - a[..., design.query])


def offset_table(g: torch.Tensor, visible: torch.Tensor, fill=float("-inf")) -> torch.Tensor:
    """G[..., i, j] = g[..., i - j] on visible pairs, `fill` elsewhere."""
    T = visible.shape[0]
    delta = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0)
    return g[..., delta].masked_fill(~visible, fill)


# ------------------------------------------------------------------ logit components
def split_half_signal(res_a: torch.Tensor, res_b: torch.Tensor, design: TwoWayDesign):
    """mean_{j in W(i)} R^A_ij R^B_ij: an unbiased estimate of the squared residual signal at
    query i (noise in the two halves is independent, so its product averages to zero).
    Signed: it may be slightly negative when there is no signal. (..., T)."""
    return per_query(res_a.double() * res_b.double(), design) / design.rows


def split_half_key0(res_a: torch.Tensor, res_b: torch.Tensor, design: TwoWayDesign):
    """The key-0 column's share of split_half_signal: R^A_i0 R^B_i0 / n_i, (..., T). The rest,
    keys j >= 1, is split_half_signal minus this (version 3, item 1)."""
    key0 = design.offset == design.query  # pairs (i, 0)
    products = res_a[..., key0].double() * res_b[..., key0].double()  # broadcast like the rest
    out = products.new_zeros(*products.shape[:-1], len(design.rows))
    return out.index_add_(-1, design.query[key0], products) / design.rows


def clamp_once(signed_mean) -> torch.Tensor:
    """sqrt(max(0, a signed split-half mean square)) of an aggregate: version 3 sums signed
    products over queries, heads and layers first and clamps once (clamping each query first
    adds a positive floor from noise alone)."""
    return torch.as_tensor(signed_mean, dtype=torch.float64).clamp(min=0).sqrt()


def c_res(signed_square: torch.Tensor) -> torch.Tensor:
    """C_res(i) = sqrt(max(0, split-half mean square))."""
    return signed_square.clamp(min=0).sqrt()


def abs_share_terms(fit_a: TwoWayFit, fit_b: TwoWayFit, m_a, m_b, design: TwoWayDesign):
    """Numerator and denominator of abs_share = sum R^A R^B / sum M~^A M~^B over visible
    pairs, M~ = M - a(i) (each half its own a): the share of the softmax-relevant systematic
    logit structure that is not a function of i - j. Packed inputs; each (...,)."""
    tilde_a = m_a.double() - fit_a.a[..., design.query]
    tilde_b = m_b.double() - fit_b.a[..., design.query]
    return (fit_a.residue * fit_b.residue).sum(-1), (tilde_a * tilde_b).sum(-1)


def c_mask(g: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """C_mask(i) = log sum_{j in W(i)} exp g(i - j) - g(0): the log normaliser a purely
    relative query has at position i; flat logits give log(i + 1)."""
    return torch.logsumexp(offset_table(g.double(), visible), dim=-1) - g[..., :1].double()


def content_deviation(scores: torch.Tensor, mean: torch.Tensor, design: TwoWayDesign):
    """Sum over visible j of |s_ij - M_ij| per sequence, head and query: scores (N, H, T, T),
    packed mean (H, P) -> (N, H, T)."""
    return per_query((pack(scores, design).double() - mean).abs(), design)


# ------------------------------------------------------------------ sinks and fingerprints
def sink_queries(seq_len: int, window: int | None) -> slice:
    """Queries i = 1 .. min(T, w) - 1: those that can see key 0 (and are not key 0)."""
    return slice(1, min(seq_len, window or seq_len))


def sink_alpha(first_column: torch.Tensor, window: int | None) -> torch.Tensor:
    """alpha_0 per sequence and head: mean of A_i0 over the queries that can see key 0.
    first_column (N, H, T) -> (N, H)."""
    return first_column[..., sink_queries(first_column.shape[-1], window)].double().mean(-1)


def visible_keys(seq_len: int, window: int | None) -> torch.Tensor:
    """n_i = |W(i)|, the keys query i sees: i + 1, or at most w under a window. (T,)"""
    n = torch.arange(1, seq_len + 1, dtype=torch.float64)
    return n if window is None else n.clamp(max=window)


def key0_lift(first_column: torch.Tensor, window: int | None) -> torch.Tensor:
    """lambda_0 per sequence and head: the mean of n_i * A_i0 over the queries that see key 0
    (1 for uniform attention whatever the window; the share of attention key 0 gets, in units
    of its uniform share). first_column (N, H, T) -> (N, H)."""
    T = first_column.shape[-1]
    queries = sink_queries(T, window)
    n = visible_keys(T, window)[queries]
    return (first_column[..., queries].double() * n).mean(-1)


def uniform_alpha(seq_len: int, window: int | None) -> float:
    """alpha_0 of uniform attention: the mean of 1/n_i over the queries that see key 0."""
    n = visible_keys(seq_len, window)[sink_queries(seq_len, window)]
    return (1.0 / n).mean().item()


def massive_ratio(x: torch.Tensor) -> torch.Tensor:
    """||x_0|| / median_i ||x_i|| (i >= 1) per sequence: x (N, T, d) -> (N,). Position 0's
    state in units of a typical position's (the massive activations of sinks)."""
    return position_ratios(x)[:, 0]


def position_ratios(x: torch.Tensor) -> torch.Tensor:
    """||x_j|| / median_i ||x_i|| (i >= 1) of every position j per sequence: x (N, T, d) ->
    (N, T). A position other than 0 far above 1 holds a massive activation of its own."""
    norms = x.double().norm(dim=-1)
    return norms / norms[:, 1:].median(dim=-1, keepdim=True).values


def value_drain(outputs: torch.Tensor) -> torch.Tensor:
    """||W_O v_0|| / median_i ||W_O v_i|| (i >= 1) per sequence and head: the value a head
    writes from key 0 in units of a typical key's. outputs W_O v: (N, H, T, d) -> (N, H)."""
    norms = outputs.double().norm(dim=-1)
    return norms[..., 0] / norms[..., 1:].median(dim=-1).values


def dispersion(vectors: torch.Tensor) -> dict:
    """Spread across inputs of vectors (N, d): std/||mean|| and the mean pairwise cosine
    (0 and 1 when every input gives the same vector)."""
    x = vectors.double()
    mean = x.mean(0)
    spread = (x - mean).pow(2).sum(-1).mean().sqrt()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    n = x.shape[0]
    cos = (unit @ unit.T).sum().sub(n).div(n * (n - 1))
    ratio = spread / mean.norm() if mean.norm() > 0 else torch.tensor(float("nan"))
    return {"dispersion": ratio.item(), "cosine": cos.item()}


# ------------------------------------------------------------------ interventions
def rescale_(rows: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Each row scaled, in place, to sum to `total` (0 where the row holds nothing); returns
    rows. Divided before it is multiplied: a row left with almost nothing (a sink that held
    all but 1e-40 of it) would make total / rest overflow, and 0 * inf is a NaN. In place, so
    a knockout makes one copy of the attention maps, not five (a hook runs on every map of
    every intervened pass)."""
    rest = rows.sum(-1, keepdim=True)
    positive = rest > 0
    rows.div_(torch.where(positive, rest, torch.ones_like(rest))).mul_(total)
    if not positive.all():
        rows.masked_fill_(~positive, 0.0)
    return rows


def knock_out_key0(pattern: torch.Tensor) -> torch.Tensor:
    """A_i0 set to 0 for i >= 1, each row rescaled to its original total (1 without a sink)."""
    return knock_out_key(pattern, 0)


def key0_gain_removed(pattern: torch.Tensor, window: int | None) -> torch.Tensor:
    """The route-2 test (version 3, item 8): A_i0 replaced by its mean over the queries that
    see key 0 (per sequence and head), the other keys untouched. Key 0's value is the same
    for every query of a sequence, so the head's key-0 contribution A_i0 W_O v_0 keeps its
    mean and loses its position-dependent gain. (..., T, T)."""
    out = pattern.clone()
    queries = sink_queries(pattern.shape[-1], window)
    out[..., queries, 0] = pattern[..., queries, 0].mean(-1, keepdim=True)
    return out


def key0_mass_flattened(pattern: torch.Tensor, window: int | None) -> torch.Tensor:
    """Version 4's mass route: A_i0 replaced by its mean ā over the queries that see key 0
    (per sequence and head) and the other keys of each such row rescaled to keep the row's
    total, so both of key 0's routes (its write A_i0 W_O v_0 and its dilution of the content
    keys by 1 - A_i0) lose their dependence on i. (..., T, T)."""
    out = key0_gain_removed(pattern, window)
    queries = sink_queries(pattern.shape[-1], window)
    total = pattern[..., queries, :].sum(-1)
    after = total - out[..., queries, 0]
    rescale_(out[..., queries, 1:], after[..., None])  # a view: rescaled where it lies
    return out


def value0_to_mean(values: torch.Tensor) -> torch.Tensor:
    """Version 4's value ablation: position 0's value replaced by the mean of the other
    positions' values (per sequence and head), attention untouched. values (..., T, d_head)."""
    out = values.clone()
    out[..., 0, :] = values[..., 1:, :].mean(-2)
    return out


def knock_out_key(pattern: torch.Tensor, key: int) -> torch.Tensor:
    """The control knockout: A_ij for key j = `key` set to 0 for queries i > key, each row
    rescaled to its original total (knock_out_key0 is key = 0)."""
    out = pattern.clone()
    rows = out[..., key + 1 :, :]  # a view: rescaled where it lies
    total = rows.sum(-1, keepdim=True)
    rows[..., key] = 0.0
    rescale_(rows, total)
    return out


def knock_out_random_key(pattern: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Version 4's random-key control: key keys[i] (an earlier key, >= 1) of each query i >= 1
    knocked out like key 0 (its attention set to 0, the row rescaled to its original total).
    It moves whatever mass that key held: `knocked_mass` says how much, beside key 0's."""
    out = pattern.clone()
    T = pattern.shape[-1]
    i = torch.arange(1, T)
    j = keys[1:].to(pattern.device)
    total = out[..., 1:, :].sum(-1, keepdim=True)
    out[..., i, j] = 0.0
    rescale_(out[..., 1:, :], total)  # a view: rescaled where it lies
    return out


def knocked_mass(pattern: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The attention a knockout takes off its key, per query i >= 1: A_i,keys[i] (keys of
    zeros: key 0's knockout). (..., T, T) -> (..., T - 1)."""
    i = torch.arange(1, pattern.shape[-1])
    return pattern[..., i, keys[1:].to(pattern.device)]


def random_earlier_keys(seq_len: int, window: int | None, seed: int) -> torch.Tensor:
    """For each query i >= 1 a key drawn uniformly among its visible keys other than 0."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.zeros(seq_len, dtype=torch.long)
    for i in range(1, seq_len):
        first = 1 if window is None else max(1, i - window + 1)
        keys[i] = int(torch.randint(first, i + 1, (1,), generator=gen))
    return keys


def removed_fraction(swapped_sq: torch.Tensor, original_sq: torch.Tensor) -> float:
    """1 - sum C_swap(i)^2 / sum C(i)^2 over the given queries; NaN when the original is 0."""
    den = original_sq.double().sum()
    return (1 - swapped_sq.double().sum() / den).item() if den > 0 else float("nan")


# ------------------------------------------------------------------ shift test
def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance (base 2, in [0, 1]) between distributions along the last dim."""
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a / b.clamp_min(1e-300)).log2(), torch.zeros_like(a)).sum(-1)

    return ((kl(p, m) + kl(q, m)) / 2).clamp_min(0).sqrt()


def shift_distances(near: torch.Tensor, far: torch.Tensor, start_near: int, start_far: int, n: int):
    """JS distance between attention rows of the same content placed at two offsets.

    near/far (N, H, T, T) patterns; the content occupies positions start .. start + n - 1.
    Query m of the content is compared over the content keys (position 0 and any filler
    excluded), each row renormalised; keys after m carry zero weight under the causal mask,
    so the content blocks can be compared whole. Returns (N, H, n)."""
    blocks = []
    for pattern, start in ((near, start_near), (far, start_far)):
        block = pattern[..., start : start + n, start : start + n].double()
        blocks.append(block / block.sum(-1, keepdim=True).clamp_min(1e-300))
    return js_distance(*blocks)


# ------------------------------------------------------------------ baselines
def uniform_guess_mae(n: int) -> float:
    """E|X - Y| for X, Y independent and uniform on n positions: (n^2 - 1) / (3n)."""
    return (n * n - 1) / (3 * n)


def key_lift(column: torch.Tensor, key: int, window: int | None) -> torch.Tensor:
    """lambda_k per sequence and head: the mean of n_i * A_ik over the queries i > key that see
    key `key` (1 for uniform attention; key 0's lift is key0_lift). column (N, H, T): A_ik for
    every query i -> (N, H)."""
    T = column.shape[-1]
    i = torch.arange(T)
    sees = (i > key) if window is None else (i > key) & (i - key < window)
    n = visible_keys(T, window)[sees]
    return (column[..., sees].double() * n).mean(-1)
