"""The mean-logit decomposition of one layer, from its accumulated block sums.

Everything here is linear in the mean logits until the final products: the residue of the
half-A mean is the count-weighted average of the block residues, so the split-half signal and
every bootstrap replicate of it are weighted sums of one table of block-by-block products.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from posleak.analysis.engine.collect import LogitSums
from posleak.analysis.maths import measures


class LogitStats(NamedTuple):
    g: torch.Tensor  # (H, T) g(delta) of the fit to all sequences
    c_mask: torch.Tensor  # (H, T)
    signal: torch.Tensor  # (H, T) split-half mean square R^A R^B at query i (signed)
    signal_boot: torch.Tensor  # (R, H, T) its bootstrap replicates (blocks resampled)
    share_num: torch.Tensor  # (H,) sum R^A R^B over visible pairs
    share_den: torch.Tensor  # (H,) sum M~^A M~^B over visible pairs
    mean: torch.Tensor  # (H, P) mean logits M over all sequences, packed
    signal_key0: torch.Tensor  # (H, T) the key-0 column's part of signal (the rest: j >= 1)
    key0_boot: torch.Tensor  # (R, H, T) its bootstrap replicates, the same resamples
    signal_null: torch.Tensor  # (R, H, T) signal with random signs on both halves' blocks
    key0_null: torch.Tensor  # (R, H, T) the same for the key-0 part

    @property
    def abs_share(self) -> torch.Tensor:
        return self.share_num / self.share_den


def logit_stats(
    sums: LogitSums, design: measures.TwoWayDesign, boot_a: torch.Tensor, boot_b: torch.Tensor
) -> LogitStats:
    """Fits, split-half signal with bootstrap replicates, abs_share and C_mask of one layer.
    boot_a, boot_b: (R, blocks per half) bootstrap multiplicities of the A and B blocks.

    One fit per block; the halves and the full fit are count-weighted averages of the block
    fits, since the fit is linear in the mean logits."""
    fits = [measures.two_way_fit(chunk, design) for chunk in sums.block_means(chunk=4)]
    g = torch.cat([f.g for f in fits])
    a = torch.cat([f.a for f in fits])
    res = torch.cat([f.residue.to(sums.dtype) for f in fits])  # (blocks, H, P)
    count_a, count_b = sums.counts[0::2], sums.counts[1::2]
    cross = torch.stack(
        [measures.split_half_signal(r, res[1::2], design) for r in res[0::2]]
    )  # (nA, nB, H, T)
    cross_key0 = torch.stack(
        [measures.split_half_key0(r, res[1::2], design) for r in res[0::2]]
    )  # (nA, nB, H, T)
    total = count_a.sum() * count_b.sum()
    signal = torch.einsum("a,b,abhi->hi", count_a, count_b, cross) / total
    signal_key0 = torch.einsum("a,b,abhi->hi", count_a, count_b, cross_key0) / total
    wa, wb = boot_a * count_a, boot_b * count_b
    wa, wb = wa / wa.sum(1, keepdim=True), wb / wb.sum(1, keepdim=True)
    signal_boot = torch.einsum("ra,rb,abhi->rhi", wa, wb, cross)
    key0_boot = torch.einsum("ra,rb,abhi->rhi", wa, wb, cross_key0)
    # version 4: both halves' blocks flipped (one half alone keeps a signal x noise term)
    flips_a, flips_b = (
        sign_flips(len(boot_a), len(count_a), 7),
        sign_flips(len(boot_b), len(count_b)),
    )
    wa0, wb0 = flips_a * count_a, flips_b * count_b  # (R, nA), (R, nB)
    signal_null = torch.einsum("ra,rb,abhi->rhi", wa0, wb0, cross) / total
    key0_null = torch.einsum("ra,rb,abhi->rhi", wa0, wb0, cross_key0) / total
    halves = []
    for half, count in ((0, count_a), (1, count_b)):
        w = count / count.sum()
        residue = torch.einsum("b,bhp->hp", w.to(res.dtype), res[half::2]).double()
        halves.append(measures.TwoWayFit(None, torch.einsum("b,bhi->hi", w, a[half::2]), residue))
    share_num, share_den = measures.abs_share_terms(
        *halves, sums.half_mean(0), sums.half_mean(1), design
    )
    g_full = torch.einsum("b,bhi->hi", sums.counts / sums.counts.sum(), g)
    return LogitStats(
        g=g_full,
        c_mask=measures.c_mask(g_full, design.visible),
        signal=signal,
        signal_boot=signal_boot,
        share_num=share_num,
        share_den=share_den,
        mean=sums.mean(),
        signal_key0=signal_key0,
        key0_boot=key0_boot,
        signal_null=signal_null,
        key0_null=key0_null,
    )


def sign_flips(replicates: int, blocks: int, seed: int = 6) -> torch.Tensor:
    """(replicates, blocks) balanced random signs (as many +1 as -1; a middle block of an odd
    count gets 0). Flipping both halves' blocks so (independently) keeps the noise x noise part
    of the split-half product and cancels the signal and the signal x noise terms exactly
    (equal block counts), so these replicates show the floor that noise alone gives at this
    N."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.tensor([1.0] * (blocks // 2) + [-1.0] * (blocks // 2) + [0.0] * (blocks % 2))
    order = torch.stack([torch.randperm(blocks, generator=gen) for _ in range(replicates)])
    return signs.double()[order]


def pooled(signal: torch.Tensor) -> torch.Tensor:
    """Mean over heads (dim -2) of a signed split-half signal."""
    return signal.mean(-2)


def early_sum(signal: torch.Tensor, k: int | None) -> torch.Tensor:
    """sum over queries 1 <= i < k of C(i)^2 = max(0, signal(i)); position 0 excluded."""
    return signal[..., 1:k].clamp(min=0).sum(-1)


PARTS = ("all", "key0", "rest")


def parts(st) -> dict:
    """{part: (signed, bootstrap, null)} pooled over heads, (T,), (R, T), (R, T): the whole
    split-half signal, its key-0 column and the rest (keys j >= 1)."""
    whole = (st.signal, st.signal_boot, st.signal_null)
    key0 = (st.signal_key0, st.key0_boot, st.key0_null)
    rest = tuple(a - b for a, b in zip(whole, key0, strict=True))
    return {
        name: tuple(t.mean(-2) for t in p)
        for name, p in zip(PARTS, (whole, key0, rest), strict=False)
    }


def local_fit(analysis, sums):
    """Version 3, item 3: the two-way fit on the sub-triangle of queries i < K_fit only."""
    k = min(analysis.opts.fit_queries, analysis.T)
    design = measures.two_way_design(sums.visible[:k, :k])
    return logit_stats(sums.prefix(k), design, analysis.boot_a, analysis.boot_b)
