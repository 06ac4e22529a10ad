"""Measurements (definitions v3) against closed forms, dense solves, nested loops, and planted
signals of known size at realistic noise: each metric must find what was planted and stay at
zero when nothing was."""

import math

import pytest
import torch

from posleak.analysis.engine.collect import LogitSums
from posleak.analysis.maths import measures, probe
from posleak.analysis.maths.logits import early_sum, logit_stats, pooled
from posleak.analysis.maths.seeds import paired_difference, t_quantile_975
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.model.masks import attention_mask

GEN = torch.Generator().manual_seed(0)


def unpack(packed: torch.Tensor, design: measures.TwoWayDesign) -> torch.Tensor:
    """(..., P) -> (..., T, T), zero on masked pairs."""
    T = design.visible.shape[0]
    out = packed.new_zeros(*packed.shape[:-1], T * T)
    out[..., design.pairs] = packed
    return out.view(*packed.shape[:-1], T, T)


def randn(*shape, gen=GEN):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def relative_plus_offsets(H, T, visible):
    """Logits g(i - j) + a(i) with arbitrary g and a: nothing softmax-relevant is absolute."""
    g, a = randn(H, T), randn(H, T)
    return measures.offset_table(g, visible, fill=0.0) + a[..., None], g


def dense_two_way(m, visible):
    """Reference: least squares over visible pairs with an explicit design matrix."""
    T = visible.shape[0]
    i, j = visible.nonzero(as_tuple=True)
    X = torch.zeros(len(i), 2 * T, dtype=torch.float64)
    X[torch.arange(len(i)), i - j] = 1.0  # g(delta)
    X[torch.arange(len(i)), T + i] = 1.0  # a(i)
    coef = torch.linalg.lstsq(X, m[i, j][:, None], driver="gelsd").solution[:, 0]
    residue = torch.zeros(T, T, dtype=torch.float64)
    residue[i, j] = m[i, j] - X @ coef
    return coef[:T], residue


def accumulate(mean_logits, n, noise, visible, blocks=16, batch=64, gen=GEN):
    """LogitSums over n sequences of mean_logits plus i.i.d. per-sequence noise."""
    H = mean_logits.shape[0]
    sums = LogitSums(blocks, H, visible)
    for start in range(0, n, batch):
        rows = torch.arange(start, min(start + batch, n))
        scores = mean_logits + noise * randn(len(rows), *mean_logits.shape, gen=gen)
        sums.add(scores.masked_fill(~visible, float("-inf")), rows)
    half = blocks // 2
    return sums, bootstrap_weights(half, 200, 1), bootstrap_weights(half, 200, 2)


def stats_of(mean_logits, n, noise, visible):
    sums, wa, wb = accumulate(mean_logits, n, noise, visible)
    return logit_stats(sums, measures.two_way_design(visible), wa, wb)


# ------------------------------------------------------------------ the two-way fit
@pytest.mark.parametrize("window", [None, 5])
def test_two_way_fit_equals_a_dense_least_squares_solve(window):
    T = 12
    visible = attention_mask(T, window)
    m = randn(T, T)
    design = measures.two_way_design(visible)
    fit = measures.two_way_fit(measures.pack(m, design), design)
    _, ref_residue = dense_two_way(m, visible)
    assert torch.allclose(unpack(fit.residue, design), ref_residue, atol=1e-10)


@pytest.mark.parametrize("window", [None, 7])
def test_relative_logits_with_query_offsets_leave_no_residue_and_g_is_recovered(window):
    T, H = 40, 3
    visible = attention_mask(T, window)
    m, g = relative_plus_offsets(H, T, visible)
    design = measures.two_way_design(visible)
    m = measures.pack(m, design)
    fit = measures.two_way_fit(m, design)
    assert fit.residue.abs().max() < 1e-10
    seen = design.by_offset.sum(0) > 0  # offsets some query can see
    shift = (fit.g - g)[:, seen]
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-10)  # up to a constant
    num, den = measures.abs_share_terms(fit, fit, m, m, design)
    assert num.abs().max() < 1e-16 * den.abs().max() + 1e-12


def test_split_half_c_res_and_abs_share_are_exactly_zero_for_noise_free_relative_logits():
    T, H = 24, 2
    visible = attention_mask(T)
    m, _ = relative_plus_offsets(H, T, visible)
    stats = stats_of(m, 64, 0.0, visible)
    assert stats.signal.abs().max() < 1e-18 + 1e-12 * m.abs().max() ** 2
    assert stats.share_num.abs().max() < 1e-12


def test_flat_logits_give_c_mask_log_i_plus_1_and_a_constant_under_a_window():
    T, w = 20, 6
    for window, counts in ((None, range(1, T + 1)), (w, [min(i + 1, w) for i in range(T)])):
        visible = attention_mask(T, window)
        design = measures.two_way_design(visible)
        fit = measures.two_way_fit(torch.zeros(2, len(design.pairs)), design)
        cm = measures.c_mask(fit.g, visible)
        expected = torch.tensor(list(counts), dtype=torch.float64).log()
        assert torch.allclose(cm, expected.expand(2, T), atol=1e-12)


def test_c_mask_matches_a_nested_loop():
    T = 10
    g = randn(1, T)
    visible = attention_mask(T, 4)
    cm = measures.c_mask(g, visible)
    for i in range(T):
        ref = (
            math.log(sum(math.exp(g[0, i - j].item()) for j in range(T) if visible[i, j]))
            - g[0, 0].item()
        )
        assert cm[0, i].item() == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------------ planted signals
def planted_key0_experiment(amplitude, n=1024, noise=2.0, T=64, H=2):
    """Relative logits + per-query offsets + `amplitude` extra logit on key 0 for every query,
    with per-sequence noise 4x the planted term. Returns (estimated, true) signal per query."""
    visible = attention_mask(T)
    design = measures.two_way_design(visible)
    base, _ = relative_plus_offsets(H, T, visible)
    plant = torch.zeros(H, T, T, dtype=torch.float64)
    plant[:, :, 0] = amplitude
    stats = stats_of(base + plant, n, noise, visible)
    truth = measures.two_way_fit(measures.pack(plant, design), design).residue
    return stats, pooled(measures.split_half_signal(truth, truth, design))


def test_c_res_recovers_a_planted_key0_term_under_much_larger_noise():
    stats, truth = planted_key0_experiment(0.5)
    est = early_sum(pooled(stats.signal), 16).item()
    true = early_sum(truth, 16).item()
    assert math.sqrt(est / true) == pytest.approx(1.0, abs=0.1)  # C_res within 10%
    lo, hi = torch.quantile(
        early_sum(pooled(stats.signal_boot), 16), torch.tensor([0.025, 0.975]).double()
    )
    assert lo < true < hi  # the bootstrap interval covers the planted size


def test_removing_the_planted_term_removes_at_least_95_percent_and_noise_alone_is_zero():
    planted, _ = planted_key0_experiment(0.5)
    removed, _ = planted_key0_experiment(0.0)
    fraction = measures.removed_fraction(
        early_sum(pooled(removed.signal), 16), early_sum(pooled(planted.signal), 16)
    )
    assert fraction >= 0.95
    signed = pooled(removed.signal)[1:16].sum()  # unbiased: may be slightly negative
    se = pooled(removed.signal_boot)[:, 1:16].sum(-1).std()
    assert abs(signed) < 3 * se
    assert removed.share_num.sum().abs() < 0.05 * planted.share_num.sum()


def test_per_query_offsets_count_as_nothing():
    """a(i) = 0.01 i leaves attention unchanged; v1's Delta R^2 counted it as leakage."""
    T = 32
    visible = attention_mask(T)
    m, _ = relative_plus_offsets(1, T, visible)
    m = m + 0.01 * torch.arange(T, dtype=torch.float64)[:, None]
    stats = stats_of(m, 32, 0.0, visible)
    assert stats.signal.abs().max() < 1e-12


def test_split_half_signal_from_blocks_equals_the_direct_product_of_half_residues():
    T = 16
    visible = attention_mask(T)
    design = measures.two_way_design(visible)
    sums, wa, wb = accumulate(randn(2, T, T), 48, 1.0, visible)
    stats = logit_stats(sums, design, wa, wb)
    ra = measures.two_way_fit(sums.half_mean(0), design).residue
    rb = measures.two_way_fit(sums.half_mean(1), design).residue
    direct = measures.split_half_signal(ra, rb, design)
    assert torch.allclose(stats.signal, direct, atol=1e-12)


# ------------------------------------------------------------------ probes
def test_cross_validated_ridge_finds_a_small_position_ramp_a_fixed_ridge_misses():
    """Content in every direction plus a position ramp in one low-variance direction."""
    N, T, d = 64, 32, 24
    gen = torch.Generator().manual_seed(1)
    content = torch.randn(N, T, d, generator=gen, dtype=torch.float64)
    ramp = torch.zeros(d, dtype=torch.float64)
    ramp[-1] = 1.0
    x = content.clone()
    x[..., -1] = 0.005 * torch.randn(N, T, generator=gen, dtype=torch.float64)
    x = x + 0.003 * torch.arange(T, dtype=torch.float64)[None, :, None] * ramp
    x = x @ torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]  # mix
    positions = torch.arange(1, T)
    feats = x[:, 1:]
    a, b = torch.arange(0, N, 2), torch.arange(1, N, 2)
    groups = torch.arange(len(a)).repeat_interleave(T - 1)
    train = feats[a].reshape(-1, d)
    fixed = probe.fit(train, positions.repeat(len(a)), groups, "linear", grid=(1e-2,))
    cv = probe.fit(train, positions.repeat(len(a)), groups, "linear")
    assert probe.score(fixed, feats[b], positions).r2 < 0.5
    assert probe.score(cv, feats[b], positions).r2 > 0.9
    assert cv.lam < 1e-2


def test_probe_on_position_free_features_stays_at_zero():
    N, T, d = 64, 32, 16
    x = torch.randn(N, T, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    positions = torch.arange(1, T)
    a, b = torch.arange(0, N, 2), torch.arange(1, N, 2)
    groups = torch.arange(len(a)).repeat_interleave(T - 1)
    p = probe.fit(x[a, 1:].reshape(-1, d), positions.repeat(len(a)), groups, "log")
    assert abs(probe.score(p, x[b, 1:], positions).r2) < 0.05


def test_ridge_matches_a_closed_form_solve():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(50, generator=gen, dtype=torch.float64)
    p = probe.fit(x, y, torch.arange(50), "linear", grid=(0.5,))
    z = (x - x.mean(0)) / x.std(0)
    zc = z - z.mean(0)
    beta = torch.linalg.solve(
        zc.T @ zc + 0.5 * 50 * torch.eye(4, dtype=torch.float64), zc.T @ (y - y.mean())
    )
    assert torch.allclose(p.beta, beta, atol=1e-10)


def test_probe_sums_added_batch_by_batch_equal_one_fit_even_far_from_the_origin():
    """The analysis streams the residual stream into ProbeData a few sequences at a time; the
    sums are taken about the first batch's mean, so a mean of 1e4 (massive activations) loses
    nothing against the same features centred by hand."""
    N, T, d = 24, 16, 6
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, T, d, generator=gen, dtype=torch.float64)
    x[..., 0] += 0.05 * torch.arange(T, dtype=torch.float64)  # a position ramp
    positions = torch.arange(T)
    far = x + 1e4
    data = probe.ProbeData(d)
    for start in range(0, N, 5):
        part = far[start : start + 5]
        groups = torch.arange(start, start + len(part)).repeat_interleave(T)
        data.add(part.reshape(-1, d), positions.repeat(len(part)), groups)
    groups = torch.arange(N).repeat_interleave(T)
    for target in ("linear", "log"):
        streamed = data.fit(target)
        whole = probe.fit(x.reshape(-1, d), positions.repeat(N), groups, target)
        assert streamed.lam == whole.lam
        assert torch.allclose(streamed.beta, whole.beta, rtol=1e-6, atol=1e-9)
        assert torch.allclose(streamed.predict(far), whole.predict(x), atol=1e-6)


def test_baselines():
    n = 7
    brute = sum(abs(a - b) for a in range(n) for b in range(n)) / n**2
    assert measures.uniform_guess_mae(n) == pytest.approx(brute)
    pos = torch.arange(1, 101)
    assert probe.mean_baseline_mae(pos, pos) == pytest.approx(25.0)  # n/4: beats (n^2-1)/(3n)


# ------------------------------------------------------------------ sinks, knockout, shift
def test_alpha0_counts_only_queries_that_can_see_key0():
    T, w = 128, 32
    column = torch.zeros(1, 1, T)
    column[..., 0] = 1.0
    column[..., 1:w] = 0.9  # a head parking 90% of its attention on key 0 while it can
    assert measures.sink_alpha(column, w).item() == pytest.approx(0.9)
    assert column[..., 1:].mean().item() < 0.3  # v1's average over every query


def test_key0_knockout_zeroes_the_column_and_keeps_each_row_total():
    p = torch.softmax(randn(2, 3, 8, 8).masked_fill(~attention_mask(8), float("-inf")), -1)
    k = measures.knock_out_key0(p)
    assert torch.equal(k[..., 0, :], p[..., 0, :])
    assert k[..., 1:, 0].abs().max() == 0
    assert torch.allclose(k.sum(-1), p.sum(-1))
    expected = p.clone()
    expected[..., 1:, 0] = 0
    expected = expected / expected.sum(-1, keepdim=True)  # the other keys scale together
    assert torch.allclose(k, expected)


def test_shift_test_is_exactly_zero_for_relative_logits_even_with_a_key0_term():
    T, n, delta = 20, 8, 11
    g = randn(1, T)

    def pattern(length):
        s = measures.offset_table(g, attention_mask(length), fill=0.0).clone()
        s[..., 0] += 3.0  # absolute logit on key 0: excluded from the comparison
        return s.masked_fill(~attention_mask(length), float("-inf")).softmax(-1)[None]

    d = measures.shift_distances(pattern(1 + n), pattern(1 + delta + n), 1, 1 + delta, n)
    assert d.abs().max() < 1e-7
    bumped = pattern(1 + delta + n).clone()
    bumped[..., 1 + delta + 3, 1 + delta] *= 2
    assert measures.shift_distances(pattern(1 + n), bumped, 1, 1 + delta, n)[..., 3] > 0.01


def test_js_distance_properties():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.0, 1.0])
    assert measures.js_distance(p, p).item() == 0
    assert measures.js_distance(p, q).item() == pytest.approx(1.0)


def test_content_deviation_matches_a_loop():
    visible = attention_mask(5)
    design = measures.two_way_design(visible)
    s = randn(3, 1, 5, 5)
    m = s.mean(0)
    got = measures.content_deviation(s, measures.pack(m, design), design)
    for n in range(3):
        for i in range(5):
            ref = sum(abs(s[n, 0, i, j] - m[0, i, j]) for j in range(i + 1))
            assert got[n, 0, i].item() == pytest.approx(ref.item())


# ------------------------------------------------------------------ intervals
def test_paired_t_interval_matches_a_hand_computation_on_three_seeds():
    ref = {0: 1.0, 1: 2.0, 2: 3.0}
    var = {0: 1.5, 1: 2.7, 2: 3.4, 5: 9.0}  # seed 5 has no partner
    d = paired_difference(var, ref)
    diffs = [0.5, 0.7, 0.4]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.302652730 * sd / math.sqrt(3)
    assert (d.mean, d.lo, d.hi, d.n) == pytest.approx((mean, mean - half, mean + half, 3))
    assert d.finding
    assert not paired_difference({0: 1.5, 1: 2.7}, ref).finding  # n = 2: never a finding


def test_t_quantiles_table_and_expansion_agree_where_they_meet():
    assert t_quantile_975(2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile_975(31) < t_quantile_975(30)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-4)


def test_figures_switch_to_a_log_axis_only_when_positive_values_span_decades():
    import matplotlib.pyplot as plt

    from posleak.analysis.reports.plots import log_if_decades

    for ys, expected in (
        ([0.01, 1.0, 5.0], "log"),
        ([0.5, 1.0, 5.0], "linear"),
        ([-1, 100], "linear"),
    ):
        fig, ax = plt.subplots()
        ax.plot(range(len(ys)), ys)
        log_if_decades(ax)
        assert ax.get_yscale() == expected
        plt.close(fig)


# ------------------------------------------------------------------ v3: sinks against uniform
def attention_rows(N, H, T, window, sink_bias, gen, rank=2):
    """Softmax rows of low-rank content logits q_i.k_j (exchangeable across keys), with
    sink_bias[h] added to key 0's logit: the key-0 column A_i0, (N, H, T)."""
    q = torch.randn(N, H, T, rank, generator=gen, dtype=torch.float64)
    k = torch.randn(N, H, T, rank, generator=gen, dtype=torch.float64)
    logits = q @ k.transpose(-1, -2)
    logits[..., 0] += torch.tensor(sink_bias, dtype=torch.float64)[None, :, None]
    logits = logits.masked_fill(~attention_mask(T, window), float("-inf"))
    return logits.softmax(-1)[..., 0]


def test_key0_lift_finds_a_planted_sink_and_reads_one_for_uniform_heads():
    """At the study's N, T and H: one head parks attention on key 0, three do not."""
    N, H, T = 128, 4, 256
    column = attention_rows(N, H, T, None, [6.0, 0.0, 0.0, 0.0], torch.Generator().manual_seed(3))
    lift = measures.key0_lift(column, None)  # (N, H)
    n = torch.arange(1, T + 1, dtype=torch.float64)
    by_hand = (column[..., 1:] * n[1:]).mean(-1)  # the definition, spelt out
    assert torch.allclose(lift, by_hand)
    alpha = measures.sink_alpha(column, None).mean(0)
    assert alpha[0] > 0.3 and lift[:, 0].mean() > 5  # the planted sink: both criteria
    for h in (1, 2, 3):
        mean, se = lift[:, h].mean(), lift[:, h].std() / N**0.5
        assert abs(mean - 1) < 3 * se, (h, mean, se)  # uniform in expectation: E[n_i A_i0] = 1


def test_alpha0_alone_calls_uniform_attention_a_sink_under_a_short_window_and_lift_does_not():
    """The naive rule (alpha_0 > 0.3) flags every head when w = 3, where uniform attention gives
    alpha_0 = mean 1/n_i = 0.334; the lift reads exactly 1 and flags none."""
    T, w = 256, 3
    visible = attention_mask(T, w).double()
    column = (visible / visible.sum(-1, keepdim=True))[None, None, :, 0].expand(4, 2, T)
    alpha = measures.sink_alpha(column, w)
    assert (alpha > 0.3).all()  # a naive estimator's false positive
    assert alpha[0, 0].item() == pytest.approx(measures.uniform_alpha(T, w))
    assert torch.allclose(measures.key0_lift(column, w), torch.ones(4, 2, dtype=torch.float64))
    assert measures.uniform_alpha(256, None) == pytest.approx(
        sum(1 / (i + 1) for i in range(1, 256)) / 255
    )


def test_massive_ratio_and_value_drain_recover_planted_scales_and_read_one_without():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(128, 256, 64, generator=gen, dtype=torch.float64)
    assert measures.massive_ratio(x).mean().item() == pytest.approx(1.0, abs=0.05)
    x[:, 0] *= 30.0  # a massive position-0 state
    assert measures.massive_ratio(x).mean().item() == pytest.approx(30.0, rel=0.05)
    out = torch.randn(128, 4, 256, 64, generator=gen, dtype=torch.float64)
    assert measures.value_drain(out).mean().item() == pytest.approx(1.0, abs=0.05)
    out[:, 2, 0] *= 0.01  # head 2 writes almost nothing from key 0
    drain = measures.value_drain(out).mean(0)
    assert drain[2].item() == pytest.approx(0.01, rel=0.1)
    assert drain[[0, 1, 3]].sub(1).abs().max() < 0.05


# ------------------------------------------------------------------ v3: C_res by key, clamped once
STUDY_N, STUDY_T, STUDY_H = 128, 256, 4  # the study's sequences, length and heads


def low_rank_sums(plant, visible=None, n=STUDY_N, content=1.7, rank=2, seed=7):
    """LogitSums of relative logits + per-query offsets + `plant`, with per-sequence content
    noise q_i.k_j of low rank (c_content about `content`, as in the study)."""
    H, T = plant.shape[0], plant.shape[-1]
    visible = attention_mask(T) if visible is None else visible
    base, _ = relative_plus_offsets(H, T, visible)
    gen = torch.Generator().manual_seed(seed)
    sums = LogitSums(16, H, visible)
    scale = content / (rank**0.5 * 0.8)  # mean |q.k| of unit Gaussians is ~0.8 sqrt(rank)
    for start in range(0, n, 8):
        rows = torch.arange(start, min(start + 8, n))
        q = torch.randn(len(rows), H, T, rank, generator=gen, dtype=torch.float64)
        k = torch.randn(len(rows), H, T, rank, generator=gen, dtype=torch.float64)
        scores = base + plant + scale * q @ k.transpose(-1, -2)
        sums.add(scores.masked_fill(~visible, float("-inf")), rows)
    return sums


BOOT_A, BOOT_B = bootstrap_weights(8, 200, 1), bootstrap_weights(8, 200, 2)


def low_rank_stats(plant, n=STUDY_N, content=1.7, rank=2, seed=7):
    """logit_stats of low_rank_sums under causal attention."""
    sums = low_rank_sums(plant, None, n, content, rank, seed)
    return logit_stats(sums, measures.two_way_design(sums.visible), BOOT_A, BOOT_B)


def early_parts(stats, k=16):
    """(signed early mean, its bootstrap SE, 95% null floor) of each part, pooled over heads."""
    whole = (stats.signal, stats.signal_boot, stats.signal_null)
    key0 = (stats.signal_key0, stats.key0_boot, stats.key0_null)
    rest = tuple(a - b for a, b in zip(whole, key0, strict=True))
    out = {}
    for name, (signed, boot, null) in zip(
        ("all", "key0", "rest"), (whole, key0, rest), strict=True
    ):
        signed, boot, null = signed.mean(-2), boot.mean(-2), null.mean(-2)
        floor = torch.quantile(measures.clamp_once(null[:, 1:k].mean(-1)), 0.95)
        out[name] = (signed[1:k].mean().item(), boot[:, 1:k].mean(-1).std().item(), floor.item())
    return out


def truth_parts(plant, k=16):
    """The planted signal's parts without noise: the residue of the noise-free plant."""
    T = plant.shape[-1]
    design = measures.two_way_design(attention_mask(T))
    residue = measures.two_way_fit(measures.pack(plant, design), design).residue
    whole = measures.split_half_signal(residue, residue, design).mean(-2)[1:k].mean().item()
    key0 = measures.split_half_key0(residue, residue, design).mean(-2)[1:k].mean().item()
    return {"all": whole, "key0": key0, "rest": whole - key0}


def test_the_key0_split_is_exact_on_a_nested_loop():
    T = 9
    visible = attention_mask(T, 4)
    design = measures.two_way_design(visible)
    ra, rb = randn(2, len(design.pairs)), randn(2, len(design.pairs))
    a, b = unpack(ra, design), unpack(rb, design)
    got = measures.split_half_key0(ra, rb, design)
    for i in range(T):
        n_i = int(visible[i].sum())
        expected = a[:, i, 0] * b[:, i, 0] / n_i if visible[i, 0] else torch.zeros(2)
        assert torch.allclose(got[:, i], expected.double())


def test_a_planted_key0_term_is_found_in_the_key0_part_at_the_studys_scale():
    """s_i0 += cos(i / 3) in every head: an absolute term through key 0 only."""
    plant = torch.zeros(STUDY_H, STUDY_T, STUDY_T, dtype=torch.float64)
    plant[:, :, 0] = torch.cos(torch.arange(STUDY_T, dtype=torch.float64) / 3)
    est, truth = early_parts(low_rank_stats(plant)), truth_parts(plant)
    signed, se, floor = est["key0"]
    assert abs(signed - truth["key0"]) < 3 * se + 0.1 * truth["key0"]  # recovered in size
    assert measures.clamp_once(signed) > 2 * floor  # and far above the no-signal floor
    rest, rest_se, _ = est["rest"]  # what the fit's a(i) spreads onto the other keys
    assert abs(rest - truth["rest"]) < 3 * rest_se + 0.1 * abs(truth["rest"])
    assert signed > 2 * rest  # most of it is attributed to key 0


def test_a_planted_key_position_term_is_found_in_the_rest_at_the_studys_scale():
    """s_ij += cos(j / 3) for keys j >= 1: absolute position written into content keys."""
    key_term = torch.cos(torch.arange(STUDY_T, dtype=torch.float64) / 3)
    plant = key_term.expand(STUDY_H, STUDY_T, STUDY_T).clone()
    plant[:, :, 0] = 0.0
    est, truth = early_parts(low_rank_stats(plant)), truth_parts(plant)
    signed, se, floor = est["rest"]
    assert abs(signed - truth["rest"]) < 3 * se + 0.1 * truth["rest"]
    assert measures.clamp_once(signed) > 2 * floor
    key0, key0_se, _ = est["key0"]
    assert abs(key0 - truth["key0"]) < 3 * key0_se + 0.1 * abs(truth["key0"])
    assert signed > 5 * abs(key0)  # written into content keys, not into key 0


def naive_early_c_res(stats, k=16):
    """Version 2's aggregate: each query clamped at 0 first, then the root of their mean."""
    return measures.c_res(stats.signal.mean(-2)[1:k]).pow(2).mean().sqrt().item()


def test_no_signal_stays_within_3_se_of_zero_where_per_query_clamping_reads_a_floor():
    """Six experiments with nothing planted, at the study's scale. The clamped-once aggregate's
    signed mean is unbiased: zero within 3 standard errors, and under its floor. Version 2's
    estimator, each query clamped at 0 first, fails the same test: it is positive in every
    experiment, its mean many standard errors from zero."""
    signed, naive = [], []
    zero = torch.zeros(STUDY_H, STUDY_T, STUDY_T, dtype=torch.float64)
    for seed in range(6):
        stats = low_rank_stats(zero, seed=seed)
        est = early_parts(stats)
        for part, (value, se, floor) in est.items():
            assert abs(value) < 3 * se, (seed, part)
            assert measures.clamp_once(value) <= floor + 1e-12 or abs(value) < 3 * se
        signed.append(est["all"][0])
        naive.append(naive_early_c_res(stats) ** 2)
    signed, naive = torch.tensor(signed), torch.tensor(naive)
    assert abs(signed.mean()) < 3 * signed.std() / 6**0.5
    assert naive.min() > 0 and naive.mean() > 3 * naive.std() / 6**0.5  # the naive floor


def test_the_local_fit_gives_identical_early_statistics_at_T_and_at_4T():
    """The same prefixes analysed at T and at 4T: a causal model computes the same logits at
    queries i < T, so the fit on i < K_fit gives the same early-query numbers (version 2's
    fit over every query does not: queries it never compared with move its reference)."""
    from posleak.analysis.maths.logits import parts

    T, H, k_fit = 64, 2, 32
    gen = torch.Generator().manual_seed(8)
    long_visible = attention_mask(4 * T)
    base = randn(H, 4 * T, 4 * T, gen=gen)  # content-free but not relative: something to fit
    sums_long = LogitSums(16, H, long_visible)
    sums_short = LogitSums(16, H, attention_mask(T))
    for start in range(0, 64, 16):
        rows = torch.arange(start, start + 16)
        scores = base + randn(16, H, 4 * T, 4 * T, gen=gen)
        sums_long.add(scores.masked_fill(~long_visible, float("-inf")), rows)
        short = scores[..., :T, :T]
        sums_short.add(short.masked_fill(~attention_mask(T), float("-inf")), rows)
    wa, wb = bootstrap_weights(8, 50, 1), bootstrap_weights(8, 50, 2)

    def local(sums):
        design = measures.two_way_design(attention_mask(k_fit))
        return parts(logit_stats(sums.prefix(k_fit), design, wa, wb))

    a, b = local(sums_long), local(sums_short)
    for part in a:
        assert torch.allclose(a[part][0][:16], b[part][0][:16], atol=1e-6), part
    full_long = logit_stats(sums_long, measures.two_way_design(long_visible), wa, wb)
    full_short = logit_stats(sums_short, measures.two_way_design(attention_mask(T)), wa, wb)
    pooled_long, pooled_short = full_long.signal.mean(0)[1:16], full_short.signal.mean(0)[1:16]
    assert not torch.allclose(pooled_long, pooled_short, atol=1e-3)  # version 2's fit moves


# ------------------------------------------------------------------ v3: controls and the refit
def test_the_refit_score_from_moments_equals_scoring_row_by_row():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 15, 6, generator=gen, dtype=torch.float64) + 3.0
    positions = torch.arange(1, 16)
    x[..., 0] += 0.2 * torch.log1p(positions.double())
    a, b = x[0::2], x[1::2]
    fitted = probe.fit(
        a.reshape(-1, 6), positions.repeat(20), torch.arange(20).repeat_interleave(15), "log"
    )
    held = probe.ProbeData(6, 1)
    held.add(b.reshape(-1, 6), positions.repeat(20), torch.zeros(300, dtype=torch.long))
    assert probe.r2_of_moments(fitted, held) == pytest.approx(
        probe.score(fitted, b, positions).r2, abs=1e-9
    )


def test_control_knockouts_follow_their_definitions_on_a_nested_loop():
    T = 7
    p = torch.softmax(randn(2, 3, T, T).masked_fill(~attention_mask(T), float("-inf")), -1)
    assert torch.equal(measures.knock_out_key(p, 0), measures.knock_out_key0(p))
    k1 = measures.knock_out_key(p, 1)
    assert torch.equal(k1[..., :2, :], p[..., :2, :]) and k1[..., 2:, 1].abs().max() == 0
    assert torch.allclose(k1.sum(-1), p.sum(-1))
    keys = measures.random_earlier_keys(T, None, seed=0)
    assert all(1 <= keys[i] <= i for i in range(1, T))
    eq = measures.knock_out_random_key(p, keys)
    moved = measures.knocked_mass(p, keys)
    for b in range(2):
        for h in range(3):
            for i in range(1, T):
                row = p[b, h, i].clone()
                j = int(keys[i])
                assert moved[b, h, i - 1] == row[j]
                row[j] = 0.0
                row = row * p[b, h, i].sum() / row.sum()
                assert torch.allclose(eq[b, h, i], row)
    assert torch.equal(eq[..., 0, :], p[..., 0, :])
    zeros = torch.zeros(T, dtype=torch.long)  # key 0's knockout takes A_i0
    assert torch.equal(measures.knocked_mass(p, zeros), p[..., 1:, 0])


# ------------------------------------------------------------------ v3: statistics
def t_density_integral(t: float, df: int, steps: int = 200_000) -> float:
    """P(|T| >= |t|) by integrating Student's density numerically (an independent reference)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    # substitute u = atan(x) to integrate over (|t|, inf) on a finite interval
    lo, hi = math.atan(abs(t)), math.pi / 2
    h = (hi - lo) / steps
    total = 0.0
    for k in range(steps):
        u = lo + (k + 0.5) * h
        x = math.tan(u)
        total += c * (1 + x * x / df) ** (-(df + 1) / 2) * (1 + x * x) * h
    return 2 * total


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29])
def test_t_p_values_and_quantile_tables_agree_with_numerical_integration(df):
    from posleak.analysis.maths.seeds import t_quantile, t_two_sided_p

    for t in (0.3, 1.0, 2.5, t_quantile_975(df)):
        assert t_two_sided_p(t, df) == pytest.approx(t_density_integral(t, df), abs=1e-6)
    assert t_density_integral(t_quantile_975(df), df) == pytest.approx(0.05, abs=1e-4)
    assert t_density_integral(t_quantile(0.80, df), df) == pytest.approx(0.40, abs=1e-3)
    # the hand-written table these quantiles replaced (scipy.stats), to its printed digits
    table = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642}
    assert t_quantile_975(df) == pytest.approx(table[df], abs=1e-8)


def test_sign_flips_holm_and_the_detectable_effect_follow_their_definitions():
    from posleak.analysis.maths.seeds import holm, minimum_detectable, sign_flip_p, t_quantile

    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25  # all positive: 2 of 8 patterns as extreme
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert sign_flip_p([0.5, 0.4, 0.6, 0.55, 0.45, 0.5]) == pytest.approx(2 / 64)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # simulated power of the paired t-test at the MDE: 80%, at the level that decides a cell
    # (0.05 alone; 0.05 / 5 as the first step of a Holm family of five)
    gen = torch.Generator().manual_seed(11)
    n, sd = 7, 1.0
    for alpha in (0.05, 0.01):
        mde = minimum_detectable(sd, n, alpha)
        d = mde + sd * torch.randn(20000, n, generator=gen, dtype=torch.float64)
        t = d.mean(1) / (d.std(1) / n**0.5)
        power = (t.abs() > t_quantile(1 - alpha / 2, n - 1)).double().mean().item()
        assert power == pytest.approx(0.80, abs=0.015), alpha
    approximation = (t_quantile_975(n - 1) + t_quantile(0.8, n - 1)) / n**0.5  # the old formula
    assert minimum_detectable(sd, n) == pytest.approx(approximation, rel=0.05)
    assert minimum_detectable(sd, n, 0.01) > 1.3 * minimum_detectable(sd, n)


# ------------------------------------------------------------------ v3: removed shares by part
def key_position_plant(key0: float, rest: float):
    """s_i0 += key0 cos(i / 3) (the logit of key 0 itself) and s_ij += rest cos(j / 3) for
    keys j >= 1 (absolute position written into content keys)."""
    i = torch.arange(STUDY_T, dtype=torch.float64)
    plant = (rest * torch.cos(i / 3)).expand(STUDY_H, STUDY_T, STUDY_T).clone()
    plant[:, :, 0] = key0 * torch.cos(i / 3)
    return plant


def removed_truth(base_plant, other_plant) -> dict:
    """The removed share of each part without noise."""
    before, after = truth_parts(base_plant), truth_parts(other_plant)
    return {part: 1 - after[part] / before[part] for part in before}


def v2_removed_share(base, other, k=16) -> float:
    """Version 2's removed share: every key pooled, each query clamped at 0 first."""
    return (1 - early_sum(pooled(other.signal), k) / early_sum(pooled(base.signal), k)).item()


@pytest.mark.parametrize("seed", [3, 4])
def test_removed_shares_recover_a_content_key_removal_that_the_pooled_v2_share_misses(seed):
    """A BOS replacement that doubles key 0's own logit and removes 40% of the squared
    position term in the content keys, at the study's N, T and H with low-rank noise. The
    key-0 part and the rest each recover their noise-free removed share within 3 SE. The
    pooled share (version 2's) reads about 0: the two parts cancel, and a real removal is
    reported as none."""
    from posleak.analysis.stages._removal import removed_shares

    base_plant = key_position_plant(1.0, 1.0)
    other_plant = key_position_plant(2.0, 0.6**0.5)
    truth = removed_truth(base_plant, other_plant)
    assert 0.25 < truth["rest"] < 0.45 and truth["key0"] < -2  # the fit's a(i) spreads a little
    base, other = low_rank_stats(base_plant, seed=seed), low_rank_stats(other_plant, seed=seed)
    got = removed_shares([(base, other)], 16)
    for part in ("key0", "rest"):
        value, boot = got[part]
        se = boot[boot.isfinite()].std().item()
        assert abs(value - truth[part]) < 3 * se + 0.02 * abs(truth[part]), part
    assert abs(v2_removed_share(base, other)) < 0.1  # the naive share: no removal at all
    assert got["rest"][0] > 0.2  # where the split finds one


def test_a_replacement_that_changes_nothing_removes_nothing_within_3_se():
    """The same plant in both passes over other sequences: every part within 3 SE of 0."""
    from posleak.analysis.stages._removal import removed_shares

    plant = key_position_plant(1.0, 1.0)
    got = removed_shares([(low_rank_stats(plant, seed=3), low_rank_stats(plant, seed=13))], 16)
    for part, (value, boot) in got.items():
        assert abs(value) < 3 * boot[boot.isfinite()].std().item(), part


# ------------------------------------------------------------------ v3: where the window binds
WINDOW = 32  # the study's window


def beyond_window_plant(amplitude: float):
    """s_ij += amplitude cos(j / 3) at queries i >= w on the window's pairs only."""
    from posleak.analysis.stages.window_contrast import beyond_window

    T = STUDY_T
    pairs = beyond_window(attention_mask(T, WINDOW), WINDOW)
    key_term = amplitude * torch.cos(torch.arange(T, dtype=torch.float64) / 3)
    return (key_term * pairs).expand(STUDY_H, T, T).clone()


def window_truth(plant) -> float:
    """The window signal of a noise-free plant: the split-half product of its own residue."""
    from posleak.analysis.stages.window_contrast import beyond_window

    pairs = beyond_window(attention_mask(STUDY_T, WINDOW), WINDOW)
    design = measures.two_way_design(pairs)
    residue = measures.two_way_fit(measures.pack(plant, design), design).residue
    return measures.split_half_signal(residue, residue, design).mean(-2)[WINDOW:].mean().item()


def test_the_window_contrast_finds_a_term_beyond_the_window_in_both_models_on_the_same_pairs():
    """A position term planted where the window binds (i >= w), at the study's scale, in a
    windowed model and in a full-attention one whose keys beyond the window also carry a
    large key-0 term. Both read the planted size within 3 SE, from the same pairs. Version
    2's early-query statistic (i < 16, where window and full attention compute alike) reads
    nothing of it: a window contrast there cannot detect anything."""
    from posleak.analysis.stages.window_contrast import window_stats

    plant = beyond_window_plant(0.5)
    truth = window_truth(plant)
    outside = torch.zeros_like(plant)
    outside[:, WINDOW:, 0] = 3.0 * torch.cos(torch.arange(WINDOW, STUDY_T) / 5.0)
    windowed = low_rank_sums(plant, attention_mask(STUDY_T, WINDOW), seed=21)
    full = low_rank_sums(plant + outside, attention_mask(STUDY_T), seed=22)
    for sums in (windowed, full):
        st = window_stats(sums, WINDOW, BOOT_A, BOOT_B)
        assert abs(st.signal.item() - truth) < 3 * st.boot.std().item() + 0.05 * truth
        assert measures.clamp_once(st.signal) > 2 * torch.quantile(
            measures.clamp_once(st.null), 0.95
        )
    full_stats = logit_stats(full, measures.two_way_design(full.visible), BOOT_A, BOOT_B)
    early = full_stats.signal.mean(-2)[1:16]
    assert abs(early.mean().item()) < 0.05 * truth  # v2's early-query reading: blind here


def test_the_window_contrast_stays_within_3_se_of_zero_without_a_plant():
    from posleak.analysis.stages.window_contrast import window_stats

    zero = torch.zeros(STUDY_H, STUDY_T, STUDY_T, dtype=torch.float64)
    for seed, window in ((31, WINDOW), (32, None)):
        sums = low_rank_sums(zero, attention_mask(STUDY_T, window), seed=seed)
        st = window_stats(sums, WINDOW, BOOT_A, BOOT_B)
        assert abs(st.signal.item()) < 3 * st.boot.std().item(), window


def test_a_hybrid_models_window_layers_are_contrasted_with_its_global_layers_on_the_same_pairs():
    """Gemma 3's layout at the study's scale: two window layers carrying a position term
    beyond the window and two global layers carrying none there (but a large key-0 term at the
    same queries, outside the window's pairs). The paired difference reads the planted size
    within 3 SE; without a plant it stays within 3 SE of 0. The early-query reading (i < 16,
    where a window of 32 computes what global attention does) sees none of it."""
    from posleak.analysis.stages.window_contrast import hybrid_contrast, window_stats

    plant = beyond_window_plant(0.5)
    truth = window_truth(plant)
    outside = torch.zeros_like(plant)
    outside[:, WINDOW:, 0] = 3.0 * torch.cos(torch.arange(WINDOW, STUDY_T) / 5.0)
    windowed, full = attention_mask(STUDY_T, WINDOW), attention_mask(STUDY_T)
    for amplitude, seed in ((1.0, 51), (0.0, 61)):
        layers = [low_rank_sums(amplitude * plant, windowed, seed=seed + k) for k in (0, 1)]
        layers += [low_rank_sums(outside, full, seed=seed + k) for k in (2, 3)]
        found = hybrid_contrast(
            [window_stats(s, WINDOW, BOOT_A, BOOT_B) for s in layers], [True, True, False, False]
        )
        se = found.diff_boot.std().item()
        assert abs(found.diff.item() - amplitude * truth) < 3 * se + 0.05 * truth, amplitude
        if amplitude:
            assert found.diff.item() > 3 * se
            early = [  # the early-query reading (i < 16), where both layer types agree
                logit_stats(s, measures.two_way_design(s.visible), BOOT_A, BOOT_B)
                .signal.mean(-2)[1:16]
                .mean()
                for s in layers
            ]
            assert abs((early[0] + early[1]) / 2 - (early[2] + early[3]) / 2) < 0.05 * truth


# ------------------------------------------------------------------ v3: the route-2 test
def test_flattening_key0s_gain_removes_position_carried_by_it_and_nothing_else():
    """One head whose only position signal is the gain A_i0 = 1/(i + 1) on a fixed key-0
    value (BOS's), plus content keys of random values: a probe on its output finds position
    (R² > 0.5); with A_i0 replaced by its mean over queries (the route-2 test) a refit probe
    finds none (R² < 0.05). A pattern whose key-0 column is already flat is left exactly as
    it was."""
    gen = torch.Generator().manual_seed(41)
    N, T, d = 64, 48, 8
    visible = attention_mask(T)
    logits = torch.randn(N, 1, T, T, generator=gen, dtype=torch.float64)
    pattern = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    pattern[..., 1:, 0] = 0.0
    pattern = pattern / pattern.sum(-1, keepdim=True) * (1 - 1 / torch.arange(1, T + 1))[:, None]
    pattern[..., :, 0] = 1 / torch.arange(1, T + 1, dtype=torch.float64)
    values = torch.randn(N, 1, T, d, generator=gen, dtype=torch.float64) * 0.2
    values[..., 0, :] = 4.0  # BOS's value: the same in every sequence
    positions = torch.arange(2, T)
    groups = torch.arange(N).repeat_interleave(len(positions))

    def r2(p):
        out = (p @ values)[:, 0, 2:].reshape(-1, d)
        half = groups % 2 == 0
        data_a, data_b = probe.ProbeData(d, 4), probe.ProbeData(d, 1)
        data_a.add(out[half], positions.repeat(N)[half], groups[half] // 2)
        data_b.add(out[~half], positions.repeat(N)[~half], groups[~half] // 2)
        return probe.r2_of_moments(data_a.fit("log"), data_b)

    assert torch.allclose(pattern.sum(-1), torch.ones(N, 1, T, dtype=torch.float64))
    assert r2(pattern) > 0.5
    flattened = measures.key0_gain_removed(pattern, None)
    assert r2(flattened) < 0.05
    assert torch.equal(measures.key0_gain_removed(flattened, None), flattened)
    assert torch.equal(flattened[..., 1:], pattern[..., 1:])  # the other keys untouched


def causal_pattern(seed: int, T: int = 12, H: int = 2, sink: float = 2.0) -> torch.Tensor:
    """(1, H, T, T) causal attention rows with a key-0 preference that varies with i."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, H, T, T, generator=gen, dtype=torch.float64)
    scores[..., 0] += sink + torch.linspace(0, 2, T, dtype=torch.float64)[:, None].T
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    return scores.masked_fill(~visible, float("-inf")).softmax(-1)


def test_the_write_route_removes_exactly_the_position_dependent_gain_on_bos_value():
    pattern = causal_pattern(0)
    values = torch.randn(1, 2, 12, 5, dtype=torch.float64)
    flat = measures.key0_gain_removed(pattern, None)
    a0 = pattern[..., 1:, 0]
    mean = a0.mean(-1, keepdim=True)
    by_formula = pattern @ values
    by_formula[..., 1:, :] -= (a0 - mean)[..., None] * values[..., :1, :]
    assert torch.allclose(flat @ values, by_formula)
    drained = values.clone()
    drained[..., 0, :] = 0  # a drained sink: no write route, so nothing to remove
    assert torch.equal(flat @ drained, pattern @ drained)


def test_the_mass_route_fixes_key0s_share_and_keeps_each_rows_total_and_proportions():
    pattern = causal_pattern(1)
    mass = measures.key0_mass_flattened(pattern, None)
    a0 = pattern[..., 1:, 0]
    assert torch.allclose(mass[..., 1:, 0], a0.mean(-1, keepdim=True).expand_as(a0))
    assert torch.allclose(mass.sum(-1), pattern.sum(-1))
    ratio = mass[..., 1:, 1:] / pattern[..., 1:, 1:]  # one factor per row on the content keys
    visible = pattern[..., 1:, 1:] > 0
    row_factor = (1 - mass[..., 1:, :1]) / (1 - pattern[..., 1:, :1])
    assert torch.allclose(ratio[visible], row_factor.expand_as(ratio)[visible])
    assert torch.equal(mass[..., 0, :], pattern[..., 0, :])  # key 0's own row cannot change
    values = torch.randn(1, 2, 12, 5, dtype=torch.float64)
    values[..., 0, :] = 0  # drained: the write route is a no-op, the mass route is not
    assert not torch.allclose(mass @ values, pattern @ values)


def test_both_routes_are_exact_no_ops_on_a_head_whose_key0_share_does_not_vary():
    T = 10
    pattern = torch.zeros(1, 1, T, T, dtype=torch.float64)
    pattern[..., 0, 0] = 1.0
    for i in range(1, T):  # 0.4 on key 0 for every query, the rest spread over the others
        pattern[..., i, 0] = 0.4
        pattern[..., i, 1 : i + 1] = 0.6 / i
    for route in (measures.key0_gain_removed, measures.key0_mass_flattened):
        assert torch.allclose(route(pattern, None), pattern)


def test_routes_under_a_window_touch_only_the_queries_that_see_key0():
    T, w = 12, 4
    visible = attention_mask(T, w)
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(1, 1, T, T, generator=gen, dtype=torch.float64)
    pattern = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    for route in (measures.key0_gain_removed, measures.key0_mass_flattened):
        out = route(pattern, w)
        assert torch.equal(out[..., w:, :], pattern[..., w:, :])


def test_the_value_ablation_puts_the_mean_content_value_at_position0():
    values = torch.randn(3, 2, 9, 4)
    out = measures.value0_to_mean(values)
    assert torch.allclose(out[..., 0, :], values[..., 1:, :].mean(-2))
    assert torch.equal(out[..., 1:, :], values[..., 1:, :])


def test_knockouts_move_all_of_a_near_total_sink_without_a_nan():
    """A sink that holds all but 1e-40 of a row (float32 keeps the 1e-40 as a subnormal): the
    rest is rescaled to the row's total by dividing first; total / rest would be inf in
    float32 and 0 * inf a NaN (what a gated sink model met in the sink study)."""
    pattern = torch.zeros(1, 1, 3, 3)
    pattern[..., 0, 0] = 1.0
    pattern[..., 1, :2] = torch.tensor([1.0, 0.0])
    pattern[..., 2, :] = torch.tensor([1.0, 1e-40, 0.0])
    for knocked in (
        measures.knock_out_key0(pattern),
        measures.knock_out_random_key(pattern, torch.tensor([0, 0, 0])),
    ):
        assert torch.isfinite(knocked).all()
    assert measures.knock_out_key0(pattern)[0, 0, 2].tolist() == [0.0, 1.0, 0.0]
    assert measures.knock_out_key0(pattern)[0, 0, 1].tolist() == [0.0, 0.0, 0.0]  # held nothing
    flattened = measures.key0_mass_flattened(pattern, None)
    assert torch.isfinite(flattened).all() and flattened[0, 0, 2].sum() == pytest.approx(1.0)


def test_knockouts_rescale_their_own_copy_and_leave_the_attention_they_read():
    """The rules rescale in place, on a copy: the pattern a hook was given is unchanged (a
    later hook, or the pass's own statistics, may read it), and every row of the result is
    what the textbook rule gives (key zeroed, the rest times total / rest)."""
    scores = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(4))
    pattern = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    before = pattern.clone()
    keys = torch.tensor([0, 0, 1, 2, 1, 3, 5])
    for rule, key_of in (
        (measures.knock_out_key0, lambda i: 0),
        (lambda p: measures.knock_out_key(p, 1), lambda i: 1 if i > 1 else None),
        (lambda p: measures.knock_out_random_key(p, keys), lambda i: int(keys[i])),
    ):
        out = rule(pattern)
        assert torch.equal(pattern, before)
        for i in range(1, 7):
            key = key_of(i)
            row = pattern[..., i, :].double().clone()
            if key is not None:
                total = row.sum(-1, keepdim=True)
                row[..., key] = 0
                row = row * total / row.sum(-1, keepdim=True)
            assert torch.allclose(out[..., i, :].double(), row, atol=1e-6)
