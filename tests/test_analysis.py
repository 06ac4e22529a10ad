"""Analysis: each measurement against closed forms, nested loops and hand computation."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from analysis import measures, probe
from analysis.analyze import Analysis, Options, analyze
from analysis.collect import collect, keep
from analysis.compare import find_runs, headline_table, load_groups, write_report
from analysis.records import read
from model import Decoder, ModelConfig
from model.masks import attention_mask
from model.rope import apply_rope, rope_tables
from train.config import build
from train.loop import train

ROOT = Path(__file__).resolve().parent.parent
SMALL = Options(seqs=16, fingerprint_seqs=4, early_k=(4, 8), batch_size=8)


def tiny_model(**overrides) -> Decoder:
    base = dict(vocab_size=23, n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    return Decoder(ModelConfig(**{**base, **overrides}))


def uniform_tokens(n=32, T=24, vocab=20, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("window", [None, 5])
def test_flat_logits_give_log_count_mask_component_and_uniform_pattern(window):
    T = 20
    visible = attention_mask(T, window)
    scores = torch.zeros(3, 2, T, T).masked_fill(~visible, float("-inf"))
    g = measures.relative_profile(scores, visible)
    cm = measures.c_mask(g, visible)
    counts = torch.tensor([min(i + 1, window or T) for i in range(T)], dtype=torch.float64)
    assert torch.allclose(cm, counts.log().expand(2, T), atol=1e-12)
    if window:
        assert torch.allclose(cm[:, window - 1 :], cm[:, -1:].expand(2, T - window + 1), atol=1e-12)
    assert torch.allclose(scores.softmax(-1)[0, 0], visible / counts[:, None].float())


def test_flat_logits_through_the_model_give_exact_log_i_plus_1():
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.zero_()
    acts = collect(model, uniform_tokens(), {"blocks.0.attn.scores": keep})
    visible = attention_mask(24)
    g = measures.relative_profile(acts["blocks.0.attn.scores"], visible)
    cm = measures.c_mask(g, visible)
    assert torch.allclose(cm, torch.arange(1, 25, dtype=torch.float64).log().expand(2, 24))
    res = measures.c_res(acts["blocks.0.attn.scores"], g, visible)
    assert res["abs"].abs().max() == 0


def test_purely_relative_logits_have_zero_residue_and_c_mask_matches_a_loop():
    T, H = 16, 3
    gen = torch.Generator().manual_seed(0)
    profile = torch.randn(H, T, generator=gen, dtype=torch.float64)
    visible = attention_mask(T)
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    scores = (
        profile[:, (i - j).clamp(min=0)].expand(4, H, T, T).masked_fill(~visible, float("-inf"))
    )
    g = measures.relative_profile(scores, visible)
    assert torch.allclose(g, profile)
    assert measures.c_res(scores, g, visible)["abs"].abs().max() < 1e-12
    cm = measures.c_mask(g, visible)
    for h in range(H):
        for q in range(T):
            ref = math.log(sum(math.exp(profile[h, q - k]) for k in range(q + 1)))
            assert cm[h, q].item() == pytest.approx(ref, abs=1e-12)


def test_c_res_and_removed_fraction_match_a_nested_loop_on_a_constructed_sink():
    """Absolute residue placed only in key column 0 (a sink whose logit depends on i);
    the 'swap' halves it. Reference: plain Python loops in float64."""
    T, N = 12, 3
    gen = torch.Generator().manual_seed(1)
    rel = torch.randn(T, generator=gen, dtype=torch.float64)
    sink = torch.linspace(0.0, 3.0, T, dtype=torch.float64)
    visible = attention_mask(T)

    def build_scores(amplitude):
        s = torch.full((N, 1, T, T), float("-inf"), dtype=torch.float64)
        for q in range(T):
            for k in range(q + 1):
                s[:, 0, q, k] = rel[q - k] + (amplitude * sink[q] if k == 0 else 0.0)
        return s

    def reference_c_res(amplitude):
        rel_, sink_ = rel.tolist(), sink.tolist()
        g = []
        for d in range(T):
            vals = [rel_[d] + (amplitude * sink_[q] if q - d == 0 else 0.0) for q in range(d, T)]
            g.append(sum(vals) / len(vals))
        out = []
        for q in range(T):
            r = [
                abs(rel_[q - k] + (amplitude * sink_[q] if k == 0 else 0.0) - g[q - k])
                for k in range(q + 1)
            ]
            out.append(sum(r) / len(r))
        return out

    results = {}
    for amp in (1.0, 0.5):
        s = build_scores(amp)
        g = measures.relative_profile(s, visible)
        results[amp] = measures.c_res(s, g, visible)["abs"].mean(dim=(0, 1))
        assert torch.allclose(
            results[amp], torch.tensor(reference_c_res(amp), dtype=torch.float64), atol=1e-12
        )
    k = 6
    ref_orig, ref_swap = reference_c_res(1.0), reference_c_res(0.5)
    expected = 1 - (sum(ref_swap[:k]) / k) / (sum(ref_orig[:k]) / k)
    got = measures.removed_fraction(results[0.5][:k].mean().item(), results[1.0][:k].mean().item())
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.3 < got < 0.7


def test_uniform_guess_mae_matches_enumeration():
    n = 7
    brute = sum(abs(a - b) for a in range(n) for b in range(n)) / n**2
    assert measures.uniform_guess_mae(n) == pytest.approx(brute)


def test_js_distance_properties():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.0, 1.0])
    assert measures.js_distance(p, p).item() == 0
    assert measures.js_distance(p, q).item() == pytest.approx(1.0)
    assert measures.js_distance(p, torch.tensor([0.25, 0.75, 0.0])).item() == pytest.approx(
        measures.js_distance(torch.tensor([0.25, 0.75, 0.0]), p).item()
    )


# ------------------------------------------------------------------ the tensors themselves
@pytest.mark.parametrize("position", ["rope", "nope"])
def test_a_layer_recomputed_by_hand_equals_the_next_cached_hidden_state(position):
    model = Decoder(
        ModelConfig(vocab_size=23, n_layer=2, n_head=2, d_model=16, position=position, window=6)
    )
    tokens = uniform_tokens(n=3, T=10)
    names = ["blocks.1.resid_pre", "blocks.1.resid_post", "blocks.1.attn.pattern"]
    _, cache = model.run_with_cache(tokens, names)
    block = model.layers[1]
    x = cache["blocks.1.resid_pre"].double()
    w = {k: v.double() for k, v in block.state_dict().items()}

    def rms(v, weight):
        return v / (v.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight

    h = rms(x, w["input_layernorm.weight"])
    B, T, _ = h.shape
    q = (h @ w["self_attn.q_proj.weight"].T).view(B, T, 2, 8).transpose(1, 2)
    k = (h @ w["self_attn.k_proj.weight"].T).view(B, T, 2, 8).transpose(1, 2)
    v = (h @ w["self_attn.v_proj.weight"].T).view(B, T, 2, 8).transpose(1, 2)
    if position == "rope":
        cos, sin = rope_tables(T, 8, 10000.0)
        q, k = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double())
    scores = torch.empty(B, 2, T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(T):
            visible = j <= i and i - j < 6
            scores[:, :, i, j] = (
                (q[:, :, i] * k[:, :, j]).sum(-1) / math.sqrt(8) if visible else -math.inf
            )
    pattern = scores.softmax(-1)
    assert torch.allclose(pattern, cache["blocks.1.attn.pattern"].double(), atol=1e-6)
    attn = (pattern @ v).transpose(1, 2).reshape(B, T, 16) @ w["self_attn.o_proj.weight"].T
    mid = x + attn
    m = rms(mid, w["post_attention_layernorm.weight"])
    mlp = (F.silu(m @ w["mlp.gate_proj.weight"].T) * (m @ w["mlp.up_proj.weight"].T)) @ w[
        "mlp.down_proj.weight"
    ].T
    assert torch.allclose(mid + mlp, cache["blocks.1.resid_post"].double(), atol=1e-5)


# ------------------------------------------------------------------ probes and delta R^2
def test_probe_decodes_a_learned_table_and_not_position_free_embeddings():
    tokens = uniform_tokens(n=64, T=32)
    train = torch.arange(64) % 2 == 0
    learned = tiny_model(position="learned", d_model=64)  # d > T: random rows independent
    with torch.no_grad():
        learned.pos_embed.weight.mul_(50)  # a table that dominates the token embedding
    for model, low, high in (
        (learned, 0.95, 1.01),
        (tiny_model(position="rope"), -0.05, 0.05),
        (tiny_model(position="nope"), -0.05, 0.05),
    ):
        acts = collect(model, tokens, {"blocks.0.resid_pre": keep})
        r2 = probe.position_probe(acts["blocks.0.resid_pre"], train)["probe_r2"]
        assert low < r2 < high, (model.cfg.position, r2)


def test_probe_fits_only_on_training_sequences(monkeypatch):
    N, T, d = 10, 8, 4
    resid = torch.randn(N, T, d)
    resid[..., 0] = torch.arange(N, dtype=torch.float32)[:, None]  # sequence id in feature 0
    train = torch.tensor([True, False] * 5)
    seen = {}
    original = probe.ridge_fit_predict

    def spy(x_train, y_train, x_test, alpha):
        seen["train"], seen["test"] = set(x_train[:, 0].tolist()), set(x_test[:, 0].tolist())
        return original(x_train, y_train, x_test, alpha)

    monkeypatch.setattr(probe, "ridge_fit_predict", spy)
    probe.position_probe(resid, train)
    assert seen["train"] == {0, 2, 4, 6, 8} and seen["test"] == {1, 3, 5, 7, 9}


def test_delta_r2_is_zero_without_absolute_input_and_positive_with_it():
    model = tiny_model(position="rope", n_head=2)
    tokens = uniform_tokens(n=64, T=24)
    visible = attention_mask(24)
    train = torch.arange(64) % 2 == 0
    scores = collect(model, tokens, {"blocks.0.attn.scores": keep})["blocks.0.attn.scores"]
    clean = measures.delta_r2(scores, visible, train)["delta"]
    assert clean.abs().max() < 2e-3, clean

    def add_key_position(scores, name):  # an absolute term by construction: 0.02 * j
        return scores + 0.02 * torch.arange(scores.shape[-1])

    names = {"blocks.0.attn.scores": keep}
    leaky = collect(
        model, tokens, names, interventions=[("blocks.0.attn.scores", add_key_position)]
    )
    dirty = measures.delta_r2(leaky["blocks.0.attn.scores"], visible, train)["delta"]
    assert dirty.min() > 0.05, dirty


# ------------------------------------------------------------------ end to end on trained runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for variant in ("rope", "nope"):
        for seed in (0, 1):
            cfg = build(tiny_overrides(model__position=variant, seed=seed, train__steps=6))
            out = root / f"{variant}-s{seed}"
            train(cfg, out)
            (out / "sweep.json").write_text(json.dumps({"variant": variant, "seed": seed}))
    return root


def test_fingerprint_is_exactly_zero_with_bos_and_positive_without(runs):
    analysis = Analysis(runs / "rope-s0", SMALL)
    analysis.fingerprints()
    rows = analysis.rec.rows
    bos = [
        r["value"]
        for r in rows
        if r["metric"] == "fingerprint_dispersion" and r["condition"] == "bos"
    ]
    nobos = [
        r["value"]
        for r in rows
        if r["metric"] == "fingerprint_dispersion" and r["condition"] == "nobos"
    ]
    assert bos == [0.0] * 3 and all(v > 0.01 for v in nobos)


def test_bos_replacement_changes_only_position_zero_of_the_embedding(runs):
    analysis = Analysis(runs / "rope-s0", SMALL)
    tokens = analysis.tokens("always")
    for kind in SMALL.swaps:
        vector = analysis.replacement(kind, tokens)

        def swap(embed, name, vector=vector):
            embed = embed.clone()
            embed[:, 0] = vector
            return embed

        orig = collect(analysis.model, tokens, {"embed": keep})["embed"]
        new = collect(analysis.model, tokens, {"embed": keep}, interventions=[("embed", swap)])[
            "embed"
        ]
        assert torch.equal(orig[:, 1:], new[:, 1:])
        assert torch.equal(new[:, 0], vector.expand_as(new[:, 0]))
        assert not torch.equal(orig[:, 0], new[:, 0])
    table = analysis.model.embed_tokens.weight
    assert analysis.replacement("random", tokens).norm().item() == pytest.approx(
        table[tokens[0, 0]].norm().item()
    )


METRIC_NAMES = {
    "probe_r2", "probe_r2_log", "probe_mae", "probe_mae_log", "probe_mae_uniform", "delta_r2",
    "delta_r2_null", "r2_rel", "r2_full", "g_rel", "c_mask", "c_res", "c_res_var", "sink_alpha0",
    "sink_rate", "fingerprint_dispersion", "fingerprint_cosine", "bos_swap_removed",
    "bos_swap_removed_c_mask", "bos_swap_removed_probe", "shift_js",
}  # fmt: skip


def test_analyze_writes_tidy_records_summary_and_figures(runs):
    summary = analyze(runs / "rope-s1", SMALL)
    out = runs / "rope-s1" / "analysis"
    rows = read(out / "records.jsonl")
    assert {r["metric"] for r in rows} - {"sink_gain"} == METRIC_NAMES
    assert all(
        set(r)
        == {
            "run",
            "variant",
            "seed",
            "layer",
            "head",
            "query",
            "metric",
            "value",
            "condition",
            "std",
            "n",
        }
        for r in rows
    )
    assert {r["variant"] for r in rows} == {"rope"} and {r["seed"] for r in rows} == {1}
    assert summary["per_layer"]["fingerprint_dispersion_bos"] == {0: 0.0, 1: 0.0, 2: 0.0}
    assert (out / "report.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["step"] == 6


def test_readme_documents_every_metric_name():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", readme, flags=re.M))
    assert METRIC_NAMES | {"sink_gain"} <= documented


def test_compare_groups_by_variant_and_reports_the_seed_spread(runs, tmp_path):
    groups, summaries = load_groups(find_runs([str(runs)]), SMALL)
    assert {v: len(g) for v, g in groups.items()} == {"rope": 2, "nope": 2}
    report = write_report(groups, summaries, tmp_path / "report")
    text = report.read_text()
    assert (
        "| metric | nope (n=2) | rope (n=2) |" in text
        or "| metric | rope (n=2) | nope (n=2) |" in text
    )
    for png in re.findall(r"\(([a-z_]+\.png)\)", text):
        assert (tmp_path / "report" / png).exists(), png


def test_headline_table_marks_differences_within_the_spread():
    def summary(loss):
        return {"val_loss": loss, "per_layer": {k: {} for k in ("probe_r2", "c_res")}}

    table = "\n".join(
        headline_table(
            {
                "rope": [summary(2.0), summary(2.2)],
                "near": [summary(2.1), summary(2.3)],
                "far": [summary(5.0), summary(5.1)],
            }
        )
    )
    row = next(line for line in table.splitlines() if line.startswith("| validation loss"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].endswith("≈") and not cells[3].endswith("≈")


def test_analysing_on_data_of_another_vocabulary_is_refused(runs):
    with pytest.raises(ValueError, match="special tokens"):
        Analysis(runs / "rope-s0", Options(data="bible"))


def test_rope_scale_applies_ntk_scaling_at_analysis_time_on_longer_inputs(runs):
    from model.rope import ntk_base

    analysis = Analysis(runs / "rope-s0", Options(seqs=4, seq_len=64, rope_scale=4.0))
    assert analysis.model.rope_base == ntk_base(10000.0, 4.0, 16)
    assert analysis.tokens("always").shape == (4, 64)  # twice the training length
    assert analysis.visible.shape == (64, 64)
