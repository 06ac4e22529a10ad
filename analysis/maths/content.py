"""Version 4's split of the residual-stream signal into the content keys and key 0.

The two-way fit M_ij ~ g(i - j) + a(i) runs over the content pairs only (keys j >= 1), so
a(i) cannot absorb BOS's own logit and spread it onto the content keys (version 3 fitted all
keys: a constant key-0 offset, BOS's token identity and no position at all, then read as
"position in the content keys"). Key 0 is read against that fit as the BOS offset
b(i) = M_i0 - g(i) - a(i): its mean over the early queries is BOS's token identity, its
variation b(i) - mean is position read against BOS.

Both parts are split-half products, signed, over sequence blocks: the fit is linear in the
mean logits, so a half's residue is the count-weighted mean of its blocks' residues and every
statistic, bootstrap replicate and sign-flip null is a weighted sum of one table of
block-by-block products. The null flips the signs of the blocks of **both** halves (flipping
one half keeps a signal x noise term, so the floor grew with the signal in version 3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from posleak.analysis.maths import measures

NULL_SEED = 6


class ContentSplit(NamedTuple):
    """Per head and query, pooled later: (H, T) signed split-half signals with their (R, H, T)
    bootstrap replicates and (R, H, T) both-halves sign-flip nulls, and the BOS offset."""

    content: torch.Tensor  # mean over keys j >= 1 of R^A_ij R^B_ij
    content_boot: torch.Tensor
    content_null: torch.Tensor
    key0: torch.Tensor  # (b^A(i) - mean b^A)(b^B(i) - mean b^B), 0 where b(i) is not estimable
    key0_boot: torch.Tensor
    key0_null: torch.Tensor
    bos_offset: torch.Tensor  # (H, T) b(i) of all sequences (NaN where not estimable)
    offset_queries: torch.Tensor  # (T,) bool: queries whose b(i) is estimable
    early: int  # b's mean is taken over the estimable queries 1 <= i < early


def content_split(sums, boot_a, boot_b, early: int, flips: tuple | None = None) -> ContentSplit:
    """The version-4 split of one layer's accumulated logits (a LogitSums, usually a prefix
    i < K_fit). boot_a, boot_b: (R, blocks per half) bootstrap multiplicities; `early`: the
    early queries are 1 <= i < early; `flips`: the (R, blocks per half) signs of the A and B
    blocks (default: balanced random signs, one draw per half)."""
    T = sums.visible.shape[0]
    query, key = sums.pairs // T, sums.pairs % T
    content_pairs = sums.visible.clone()
    content_pairs[:, 0] = False
    design = measures.two_way_design(content_pairs)
    on_content = key >= 1
    column = torch.full((T,), -1, dtype=torch.long)  # packed index of (i, 0), -1: not visible
    column[query[~on_content]] = (~on_content).nonzero()[:, 0]
    offsets = torch.zeros(T, dtype=torch.bool)
    offsets[design.offset] = True  # g(delta) is estimable only at offsets content pairs have
    estimable = (column >= 0) & offsets & (torch.arange(T) >= 1)
    usable = estimable.clone()
    usable[early:] = False
    residues, deviations, offsets_b = [], [], []
    for block in sums.block_means(chunk=4):
        fit = measures.two_way_fit(block[..., on_content], design)
        b = block[..., column.clamp(min=0)] - fit.g - fit.a  # (chunk, H, T)
        b = torch.where(estimable, b, torch.nan)
        mean = b[..., usable].mean(-1, keepdim=True)
        residues.append(fit.residue)
        deviations.append(torch.where(usable, b - mean, 0.0))
        offsets_b.append(b)
    res, dev, b = torch.cat(residues), torch.cat(deviations), torch.cat(offsets_b)
    cross = torch.stack(
        [measures.split_half_signal(r, res[1::2], design) for r in res[0::2]]
    )  # (nA, nB, H, T)
    cross0 = dev[0::2, None] * dev[None, 1::2]  # (nA, nB, H, T)
    count_a, count_b = sums.counts[0::2], sums.counts[1::2]
    sign_a, sign_b = flips if flips is not None else default_flips(len(boot_a), len(count_a))
    content = _weighted(cross, count_a, count_b, boot_a, boot_b, sign_a, sign_b)
    key0 = _weighted(cross0, count_a, count_b, boot_a, boot_b, sign_a, sign_b)
    weights = (sums.counts / sums.counts.sum()).to(b.dtype)
    bos_offset = torch.einsum("n,nhi->hi", weights, torch.nan_to_num(b))
    bos_offset = torch.where(estimable, bos_offset, torch.nan)
    return ContentSplit(*content, *key0, bos_offset, usable, early)


def _weighted(cross, count_a, count_b, boot_a, boot_b, sign_a, sign_b) -> tuple:
    """(signal, bootstrap replicates, null) of a table of block-by-block products."""
    total = count_a.sum() * count_b.sum()
    signal = torch.einsum("a,b,abhi->hi", count_a, count_b, cross) / total
    wa, wb = boot_a * count_a, boot_b * count_b
    wa, wb = wa / wa.sum(1, keepdim=True), wb / wb.sum(1, keepdim=True)
    boot = torch.einsum("ra,rb,abhi->rhi", wa, wb, cross)
    null = torch.einsum("ra,rb,abhi->rhi", sign_a * count_a, sign_b * count_b, cross) / total
    return signal, boot, null


def default_flips(replicates: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent balanced sign flips of the A blocks and of the B blocks."""
    from posleak.analysis.maths.logits import sign_flips

    return sign_flips(replicates, blocks, NULL_SEED), sign_flips(replicates, blocks, NULL_SEED + 1)


class Aggregate(NamedTuple):
    """A signed split-half aggregate: its value, bootstrap SE and 95% interval, the 95%
    quantile of its both-halves sign-flip null (the no-signal floor), all signed squares."""

    value: float
    se: float
    lo: float
    hi: float
    floor: float


def early_aggregate(parts: list[tuple], early: int, mask=None) -> Aggregate:
    """The mean over the given layers (a list of (signal, boot, null), each (H, T), (R, H, T),
    (R, H, T)), over heads and over the early queries 1 <= i < early (those in `mask` when
    given), signed throughout: clamping is for display only."""
    queries = torch.zeros(parts[0][0].shape[-1], dtype=torch.bool)
    queries[1:early] = True
    if mask is not None:
        queries &= mask
    if not queries.any():
        nan = float("nan")
        return Aggregate(nan, nan, nan, nan, nan)
    signal, boot, null = (
        torch.stack([p[k][..., queries].mean((-1, -2)) for p in parts]).mean(0) for k in range(3)
    )
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype))
    floor = torch.quantile(null, 0.95)
    return Aggregate(float(signal), float(boot.std()), float(lo), float(hi), float(floor))


def parts_of(split: ContentSplit) -> dict:
    """{part: (signal, boot, null)} of the two version-4 parts."""
    return {
        "content": (split.content, split.content_boot, split.content_null),
        "key0": (split.key0, split.key0_boot, split.key0_null),
    }


class Share(NamedTuple):
    value: float
    lo: float  # 95% paired bootstrap interval
    hi: float


def removed_share(layers: list[tuple], part: str, early: int) -> Share:
    """1 - S_other / S_base of one part, S the signed signal summed over heads, the early
    queries and the given (base, other) ContentSplit pairs (layers >= 1), divided once; the
    same resampled blocks in both passes make the bootstrap paired. NaN where the base sum is
    not positive (nothing to remove)."""
    total = [0.0, 0.0, 0.0, 0.0]  # base, other, and their replicates
    for base, other in layers:
        for slot, split in ((0, base), (1, other)):
            signal, boot, _ = parts_of(split)[part]
            queries = _early(split, part, early)
            total[slot] += signal[..., queries].sum()
            total[slot + 2] += boot[..., queries].sum((-1, -2))
    base, other, base_boot, other_boot = total
    if float(base) <= 0:
        nan = float("nan")
        return Share(nan, nan, nan)
    boot = torch.where(base_boot > 0, 1 - other_boot / base_boot, torch.nan)
    lo, hi = torch.nanquantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype))
    return Share(float(1 - other / base), float(lo), float(hi))


def _early(split: ContentSplit, part: str, early: int) -> torch.Tensor:
    queries = torch.zeros(split.content.shape[-1], dtype=torch.bool)
    queries[1:early] = True
    return queries & split.offset_queries if part == "key0" else queries


def local_split(analysis, sums) -> ContentSplit:
    """The split of one layer from the local fit on queries i < K_fit (the same numbers at
    any analysed length >= K_fit), early queries 1 <= i < early_queries."""
    k_fit = min(analysis.opts.fit_queries, analysis.T)
    early = min(analysis.opts.early_queries, analysis.T)
    return content_split(sums.prefix(k_fit), analysis.boot_a, analysis.boot_b, early)


PARTS = ("content", "key0")
