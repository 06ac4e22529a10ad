"""The light cone's band measurements (analysis/stages/bands.py) on planted worlds at the
light-cone study's N (256 sequences), T (128), H (2) and window (8), with the analysis's 16
blocks and 200 bootstrap replicates: token-structured logits and residual streams with a BOS
token at position 0. A term planted in one band is found there and not in any other; a world
without it reads no band above its floor. A floor per band, the naive reading, puts noise's
frontier beyond the cone in most worlds; the family-wise floor does not."""

import dataclasses
import math

import pytest
import torch
from conftest import (
    SMALL,
)

from posleak.analysis.engine.analyze import Options, analysis_of
from posleak.analysis.engine.collect import LogitSums
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.stages import chosen, sites
from posleak.analysis.stages.bands import (
    BandProbes,
    band_content,
    bands,
    cone_band,
    frontier,
    slope,
)
from posleak.model.masks import attention_mask

N, T, H, W, BLOCKS, REPLICATES, EARLY = 256, 128, 2, 8, 16, 200, 16
BOOT_A = bootstrap_weights(BLOCKS // 2, REPLICATES, seed=1)
BOOT_B = bootstrap_weights(BLOCKS // 2, REPLICATES, seed=2)
PLANTED_BAND = 5  # queries 40-47


def logits_world(seed: int, plant: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, T, T) windowed logits q_i . k_j of token-structured low-rank vectors, BOS's key
    at position 0, plus `plant` (T, T) on every sequence."""
    gen = torch.Generator().manual_seed(seed)
    vocab, rank = 48, 8
    q_of = torch.randn(H, vocab, rank, generator=gen)
    k_of = torch.randn(H, vocab, rank, generator=gen)
    tokens = torch.randint(1, vocab, (N, T), generator=gen)
    q = q_of[:, tokens].transpose(0, 1) + 0.5 * torch.randn(N, H, T, rank, generator=gen)
    k = k_of[:, tokens].transpose(0, 1) + 0.5 * torch.randn(N, H, T, rank, generator=gen)
    k[:, :, 0] = torch.randn(H, rank, generator=torch.Generator().manual_seed(99))[None]
    logits = q @ k.transpose(-1, -2) / math.sqrt(rank)
    return logits if plant is None else logits + plant


def band_plant(scale: float) -> torch.Tensor:
    """Position written into the content keys of the planted band's queries only."""
    i = torch.arange(T, dtype=torch.float32)[:, None]
    j = torch.arange(T, dtype=torch.float32)[None, :]
    in_band = (i >= PLANTED_BAND * W) & (i < (PLANTED_BAND + 1) * W) & (j >= 1)
    return scale * torch.sin(j / 2.0) * torch.cos(i / 3.0) * in_band


def accumulate(logits: torch.Tensor) -> LogitSums:
    sums = LogitSums(BLOCKS, H, attention_mask(T, W))
    sums.add(logits, torch.arange(len(logits)))
    return sums


def read(logits: torch.Tensor):
    return band_content(accumulate(logits), W, BOOT_A, BOOT_B, EARLY)


def test_the_cone_reaches_one_window_per_layer():
    assert [cone_band(l, 8, "resid") for l in range(7)] == [0, 0, 1, 2, 3, 4, 5]
    assert [cone_band(l, 8, "attn") for l in range(6)] == [0, 1, 2, 3, 4, 5]
    assert cone_band(8, 16, "resid") == 7  # 8 x 15 = 120: band 7 (112-127) is reached
    assert [len(b) for b in bands(20, 8)] == [8, 8, 4]
    assert frontier([True, False, True, False]) == 2 and frontier([False, False]) == -1
    assert slope({1: 0.0, 2: 1.0, 3: 2.0}) == pytest.approx(1.0) and slope({1: 3.0}) is None


def test_a_content_term_planted_in_one_band_is_found_there_and_nowhere_else():
    plant = band_plant(0.3)
    found = read(logits_world(1, plant))
    truth = read(plant.expand(N, H, T, T)).value  # no noise: the split halves agree exactly
    k = PLANTED_BAND
    assert truth[k] > 0.005
    assert abs(found.value[k] - truth[k]) < 3 * found.se[k], (found.value[k], truth[k])
    assert found.value[k] > found.floor[k]
    others = [b for b in range(len(found.value)) if b != k]
    assert all(found.value[b] < found.floor[b] for b in others), found
    assert found.frontier == k


def test_no_plant_reads_no_band_above_its_floor():
    found = read(logits_world(2))
    assert found.frontier == -1
    assert all(v < f for v, f in zip(found.value, found.floor, strict=True))
    assert abs(found.beyond) < 3 * found.beyond_se


def test_a_floor_per_band_puts_noise_beyond_the_cone_where_the_family_wise_floor_does_not():
    """The naive frontier (each band against its own 95% null quantile) over 24 worlds with
    no position at all, against the family-wise one (over 60 such worlds: 43% against 7%)."""
    naive = familywise = 0
    for seed in range(100, 124):
        sums = accumulate(logits_world(seed))
        found = band_content(sums, W, BOOT_A, BOOT_B, EARLY)
        familywise += found.frontier >= 0
        naive += any(
            v > per_band for v, per_band in zip(found.value, naive_floors(sums), strict=True)
        )
    assert naive >= 6, naive  # a quarter; nominally 1 - 0.95^16 = 56% for independent bands
    assert familywise <= 3, familywise  # an eighth; nominally 5%


def naive_floors(sums) -> list:
    """Each band's own 95% sign-flip quantile (what a per-band floor would be)."""
    from posleak.analysis.maths import content

    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    split = content.content_split(sums.restrict(sums.visible & (i - j < W)), BOOT_A, BOOT_B, EARLY)
    null = split.content_null.mean(-2)
    return [
        float(torch.quantile(null[:, [q for q in band if q >= 1]].mean(-1), 0.95))
        for band in bands(T, W)
    ]


def stream_world(seed: int, amplitude: float) -> tuple[torch.Tensor, float]:
    """(N, T, d) residual states: token embeddings (vocab 48) with BOS's at position 0 and
    noise, plus amplitude * (i - band centre) / W along one direction in the planted band; and
    the R² a linear probe reaches there at best."""
    gen = torch.Generator().manual_seed(seed)
    d, vocab = 64, 48
    embed = torch.randn(vocab, d, generator=gen)
    tokens = torch.randint(1, vocab, (N, T), generator=gen)
    tokens[:, 0] = 0  # BOS
    x = embed[tokens] + 0.5 * torch.randn(N, T, d, generator=gen)
    direction = torch.randn(d, generator=gen)
    direction /= direction.norm()
    band = torch.arange(PLANTED_BAND * W, (PLANTED_BAND + 1) * W)
    centred = (band.float() - band.float().mean()) / W
    x[:, band] += amplitude * centred[:, None] * direction
    # x = amplitude * c * u + e with e's covariance S (tokens uniform on 1..47, plus noise):
    # the best linear R² of c is snr / (1 + snr), snr = amplitude² var(c) u' S^-1 u
    tokens_cov = torch.cov(embed[1:].T, correction=0)
    snr = (
        amplitude**2
        * centred.var(unbiased=False)
        * direction
        @ torch.linalg.solve(tokens_cov + 0.25 * torch.eye(d), direction)
    )
    return x, float(snr / (1 + snr))


def probe_world(x: torch.Tensor):
    site = BandProbes(x.shape[-1], bands(T, W), start=1, folds=5)
    a, b = torch.arange(0, N, 2), torch.arange(1, N, 2)
    site.fit_rows(x[a], torch.arange(len(a)))
    site.fit(len(b))
    site.score_rows(x[b], torch.arange(len(b)))
    return site.result(REPLICATES)


def test_a_position_term_planted_in_one_band_of_the_stream_is_decoded_there_and_nowhere_else():
    x, best = stream_world(3, amplitude=2.0)
    found = probe_world(x)
    r2, lo, hi = found.bands[PLANTED_BAND]
    assert best > 0.3
    assert lo < best < hi + 0.02, (r2, lo, hi, best)  # held-out ridge: a little below
    assert found.frontier == PLANTED_BAND
    assert all(b[0] < 0.05 for k, b in enumerate(found.bands) if k != PLANTED_BAND)


def test_a_stream_without_position_decodes_no_band():
    x, _ = stream_world(4, amplitude=0.0)
    found = probe_world(x)
    assert found.frontier == -1
    assert all(r2 < 0.05 for r2, _, _ in found.bands if r2 is not None)


def test_the_bands_cut_a_full_model_by_its_comparators_window_and_stages_choose_what_runs(runs):
    opts = dataclasses.replace(SMALL, contrast_window=8, stages=("bands",))
    assert [s.key for s in chosen(opts)] == ["bands"]
    analysis = analysis_of(runs / "rope-s0", opts)
    rows, _ = analysis.run_all()
    bands = {r["metric"] for r in rows} - {"val_loss"}
    assert bands == {m for m in sites() if m.startswith("band_")}
    probed = [r for r in rows if r["metric"] == "band_probe_r2"]
    assert {(r["layer"], r["condition"]["band"]) for r in probed} == {
        (site, band)
        for site in range(3)
        for band in range(4)  # 32 positions, w 8
    }
    assert all(r["lo"] <= r["value"] <= r["hi"] for r in probed)
    frontiers = [r["value"] for r in rows if r["metric"] == "band_frontier"]
    assert len(frontiers) == 3 and all(-1 <= f <= 3 for f in frontiers)
    needing = [s.key for s in chosen(dataclasses.replace(SMALL, stages=("knockout_loss",)))]
    assert needing == ["probe", "knockout", "knockout_loss"]
    assert "no stage nonsense" in Options(stages=("nonsense",)).problems(32)[0]
