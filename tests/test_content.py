"""Version 4's content / key-0 split (analysis/maths/content.py) on planted worlds at the
study's N (128 sequences), T (256) and H (4), with the analysis's 16 blocks and 200 bootstrap
replicates: logits are q_i . k_j of token-structured low-rank vectors (each token has its own
query and key directions, plus per-position noise), position 0 holds a BOS token, and known
terms are planted on top. A world with everything except the effect must read zero within
3 bootstrap SE; a planted effect must be recovered against its noise-free value. Version 3's
split is run on the same worlds to show what it reads instead."""

import math

import torch

from posleak.analysis.engine.collect import LogitSums
from posleak.analysis.maths import content, measures
from posleak.analysis.maths.logits import parts
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.model.masks import attention_mask

N, T, H, BLOCKS, REPLICATES, K_FIT, EARLY = 128, 256, 4, 16, 200, 64, 16
BOOT_A = bootstrap_weights(BLOCKS // 2, REPLICATES, seed=1)
BOOT_B = bootstrap_weights(BLOCKS // 2, REPLICATES, seed=2)


def world(seed: int, key0=None, content_term=None, bos_key_seed: int = 0, t: int = T):
    """(N, H, t, t) logits: token-structured low-rank q . k with a BOS token at position 0,
    plus `key0(i)` on the key-0 column and `content_term` (t, t) on the keys j >= 1."""
    gen = torch.Generator().manual_seed(seed)
    vocab, rank = 48, 8
    q_of = torch.randn(H, vocab, rank, generator=gen)
    k_of = torch.randn(H, vocab, rank, generator=gen)
    bos_key = torch.randn(H, rank, generator=torch.Generator().manual_seed(1000 + bos_key_seed))
    tokens = torch.randint(1, vocab, (N, t), generator=gen)
    q = q_of[:, tokens].transpose(0, 1) + 0.5 * torch.randn(N, H, t, rank, generator=gen)
    k = k_of[:, tokens].transpose(0, 1) + 0.5 * torch.randn(N, H, t, rank, generator=gen)
    k[:, :, 0] = bos_key[None]  # BOS: the same key in every sequence
    logits = q @ k.transpose(-1, -2) / math.sqrt(rank)
    if key0 is not None:
        logits[..., 0] += key0(torch.arange(t, dtype=torch.float32))[:, None].T
    if content_term is not None:
        logits[..., 1:] += content_term[:, 1:]
    return logits


def accumulate(logits: torch.Tensor) -> LogitSums:
    sums = LogitSums(BLOCKS, H, attention_mask(logits.shape[-1], None))
    sums.add(logits, torch.arange(len(logits)))
    return sums.prefix(K_FIT)


def v4(logits):
    split = content.content_split(accumulate(logits), BOOT_A, BOOT_B, EARLY)
    return {p: content.early_aggregate([v], EARLY) for p, v in content.parts_of(split).items()}


def v3_rest(logits):
    """Version 3's content part: the fit over all keys, minus the key-0 column's products."""
    sums = accumulate(logits)
    design = measures.two_way_design(sums.visible)
    from posleak.analysis.maths.logits import logit_stats

    stats = logit_stats(sums, design, BOOT_A, BOOT_B)
    signal, boot, _ = parts(stats)["rest"]
    early = slice(1, EARLY)
    return float(signal[early].mean()), float(boot[:, early].mean(-1).std())


def truth(term: torch.Tensor, key0=None) -> dict:
    """The noise-free value of both parts: the same fit on the planted term alone."""
    t = K_FIT
    m = torch.zeros(t, t, dtype=torch.float64)
    m[:, 1:] = term[:t, 1:t].double()
    if key0 is not None:
        m[:, 0] = key0(torch.arange(t, dtype=torch.float64))
    visible = attention_mask(t, None)
    content_pairs = visible.clone()
    content_pairs[:, 0] = False
    design = measures.two_way_design(content_pairs)
    fit = measures.two_way_fit(measures.pack(m, design), design)
    per_query = measures.per_query(fit.residue**2, design) / design.rows
    b = m[:, 0] - fit.g[torch.arange(t)] - fit.a
    usable = torch.arange(1, EARLY)
    return {
        "content": float(per_query[1:EARLY].mean()),
        "key0": float(((b[usable] - b[usable].mean()) ** 2).sum() / (EARLY - 1)),
    }


def content_plant(scale: float, t: int = T) -> torch.Tensor:
    """Position written into the content keys: not a function of i - j plus one of i."""
    i = torch.arange(t, dtype=torch.float32)[:, None]
    j = torch.arange(t, dtype=torch.float32)[None, :]
    return scale * torch.sin(i / 3.0) * torch.cos(j / 5.0)


def test_a_constant_key0_offset_reads_zero_in_both_parts_where_version_3_reads_position():
    """BOS's token identity, no position at all: a constant offset on key 0."""
    logits = world(0, key0=lambda i: 3.0 + 0 * i)
    found = v4(logits)
    for part in ("content", "key0"):
        assert abs(found[part].value) < 3 * found[part].se, (part, found[part])
    rest, se = v3_rest(logits)
    assert rest > 10 * se, (rest, se)  # version 3 reads BOS's identity as content position


def test_a_key0_position_term_is_found_in_key0_and_not_in_the_content_keys():
    plant = lambda i: 0.8 * torch.log1p(i)  # noqa: E731
    found = v4(world(1, key0=plant))
    assert abs(found["content"].value) < 3 * found["content"].se, found["content"]
    expected = truth(torch.zeros(T, T), plant)["key0"]
    assert expected > 0.05
    assert abs(found["key0"].value - expected) < 3 * found["key0"].se, (found["key0"], expected)
    assert found["key0"].value > found["key0"].floor


def test_a_content_position_term_is_recovered_above_its_floor():
    term = content_plant(0.3)
    found = v4(world(2, content_term=term))
    expected = truth(term)["content"]
    assert abs(found["content"].value - expected) < 3 * found["content"].se, (found, expected)
    assert found["content"].value > 2 * found["content"].floor


def test_no_plant_reads_within_the_floor_and_the_floor_does_not_grow_with_the_signal():
    """Both halves flipped: the null keeps no signal x noise term (version 3's one-half flip
    doubled its floor under a plant)."""
    quiet = v4(world(3))
    loud = v4(world(3, content_term=content_plant(0.6)))
    assert quiet["content"].value < quiet["content"].floor
    assert loud["content"].floor < 1.5 * quiet["content"].floor


def removed(base, other) -> tuple[float, float, float]:
    """1 - S_other / S_base of the content part at early queries, paired bootstrap."""
    a = content.content_split(accumulate(base), BOOT_A, BOOT_B, EARLY)
    b = content.content_split(accumulate(other), BOOT_A, BOOT_B, EARLY)
    share = content.removed_share([(a, b)], "content", EARLY)
    return share.value, share.lo, share.hi


def test_a_planted_40_percent_removal_under_a_swap_that_moves_bos_is_covered():
    """The swap moves BOS's key (another token identity, another offset) and removes 40% of
    the content part's squared signal. Only the early queries enter, through the local fit on
    i < K_fit, so the worlds are drawn at length K_fit (the same numbers as a T-long world's
    prefix: tests/test_measures.py checks the local fit's prefix identity)."""
    term = content_plant(0.35, K_FIT)
    covered, v3_covered, replications, estimates = 0, 0, 30, []
    for seed in range(replications):
        base = world(10 + seed, key0=lambda i: 1.0 + 0 * i, content_term=term, t=K_FIT)
        swap = world(
            10 + seed,
            key0=lambda i: -2.0 + 0 * i,
            content_term=term * math.sqrt(0.6),
            bos_key_seed=1,
            t=K_FIT,
        )
        value, lo, hi = removed(base, swap)
        estimates.append(value)
        covered += lo <= 0.4 <= hi
        b3, s3 = v3_rest(base)[0], v3_rest(swap)[0]
        v3_covered += abs((1 - s3 / b3) - 0.4) < 0.05
    assert covered >= 0.9 * replications, covered
    assert abs(sum(estimates) / replications - 0.4) < 0.05, estimates
    assert v3_covered <= 0.5 * replications, v3_covered
