"""Analysis: each measurement against closed forms, nested loops and hand computation."""

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import blank_one_head_model, collect, keep, tiny_overrides

from posleak.analysis.engine.analyze import Options, analysis_of, analyze
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.records import FIELDS, read
from posleak.analysis.maths import measures, probe
from posleak.analysis.reports.compare import find_runs, load_groups, write_report
from posleak.analysis.stages import NUMBERS, chosen, sites, stage
from posleak.analysis.stages.bos_swap import replacement
from posleak.analysis.stages.knockout import knock_out
from posleak.analysis.stages.knockout_loss import EXCESS
from posleak.model import Decoder, ModelConfig
from posleak.model.rope import apply_rope, ntk_base, rope_tables
from posleak.train.config import build
from posleak.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
SMALL = Options(
    seqs=16, fingerprint_seqs=4, early_k=(4, 8), batch_size=8, extrapolation_seqs=4, bootstrap=50
)


def tiny_model(**overrides) -> Decoder:
    base = dict(vocab_size=23, n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    return Decoder(ModelConfig(**{**base, **overrides}))


def uniform_tokens(n=32, T=24, vocab=20, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


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


def test_probe_decodes_a_learned_table_and_not_position_free_embeddings():
    tokens = uniform_tokens(n=64, T=32)
    learned = tiny_model(position="learned", d_model=64)
    with torch.no_grad():
        learned.pos_embed.weight.mul_(50)  # a table that dominates the token embedding
    positions = torch.arange(1, 32)
    groups = torch.arange(32).repeat_interleave(31)
    for model, low, high in ((learned, 0.95, 1.01), (tiny_model(position="rope"), -0.05, 0.05)):
        x = collect(model, tokens, {"blocks.0.resid_pre": keep})["blocks.0.resid_pre"][:, 1:]
        p = probe.fit(x[0::2].reshape(-1, x.shape[-1]), positions.repeat(32), groups, "log")
        r2 = probe.score(p, x[1::2], positions).r2
        assert low < r2 < high, (model.cfg.position, r2)


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


def test_fingerprints_are_exactly_zero_with_bos_and_positive_without(runs):
    analysis = analysis_of(runs / "rope-s0", SMALL)
    stage("fingerprint").run(analysis, None)
    rows = analysis.rec.rows

    def values(metric, condition):
        return [r["value"] for r in rows if r["metric"] == metric and r["condition"] == condition]

    bos, nobos = {"bos": "always"}, {"bos": "never"}
    assert values("fingerprint_dispersion", bos) == [0.0] * 3
    assert values("fingerprint_value_dispersion", bos) == [0.0] * 4  # W_O v_0 per head
    assert all(v > 0.01 for v in values("fingerprint_dispersion", nobos))
    assert all(v > 0 for v in values("fingerprint_head_dispersion", bos))  # the gain varies


def test_bos_replacements_change_only_position_zero_and_follow_their_definitions(runs):
    analysis = analysis_of(runs / "rope-s0", SMALL)
    tokens = analysis.tokens(16, analysis.T, "analysis")[:, : analysis.T]
    table = analysis.model.embed_tokens.weight.detach()
    for kind in SMALL.swaps:
        vector = replacement(analysis, kind, tokens)

        def swap(embed, name, vector=vector):
            embed = embed.clone()
            embed[:, 0] = vector
            return embed

        orig = collect(analysis.model, tokens, {"embed": keep})["embed"]
        new = collect(analysis.model, tokens, {"embed": keep}, interventions=[("embed", swap)])
        assert torch.equal(orig[:, 1:], new["embed"][:, 1:])
        assert torch.equal(new["embed"][:, 0], vector.expand_as(new["embed"][:, 0]))
    counts: dict = {}
    for t in tokens[:, 1:].flatten().tolist():
        counts[t] = counts.get(t, 0) + 1
    by_hand = sum(c * table[t] for t, c in counts.items()) / sum(counts.values())
    assert torch.allclose(replacement(analysis, "mean", tokens), by_hand, atol=1e-6)
    most = max(counts, key=counts.get)
    assert torch.equal(replacement(analysis, "token", tokens), table[most])
    assert replacement(analysis, "random", tokens).norm().item() == pytest.approx(
        table[tokens[0, 0]].norm().item()
    )


def test_mean_replacement_has_the_norm_of_an_ordinary_token_on_real_text(tmp_path):
    cfg = build(
        tiny_overrides(data__source="bible", model__d_model=32, train__steps=40, train__lr=1e-2)
    )
    train(cfg, tmp_path / "bible")
    analysis = analysis_of(tmp_path / "bible", Options(seqs=16))
    tokens = analysis.tokens(16, analysis.T, "analysis")[:, : analysis.T]
    table = analysis.model.embed_tokens.weight.detach()
    present = tokens[:, 1:].unique()
    typical = table[present].norm(dim=1).median().item()
    mean_norm = replacement(analysis, "mean", tokens).norm().item()
    uniform_norm = table[:256].mean(0).norm().item()  # v1's average of every byte row
    assert mean_norm > 0.3 * typical
    assert mean_norm > 3 * uniform_norm


def test_key0_knockout_leaves_upstream_layers_exactly_untouched(runs):
    analysis = analysis_of(runs / "rope-s0", SMALL)
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("probes").run(analysis, ctx)
    knock_out(analysis, ctx, 1)
    removed = {
        (r["layer"], r["condition"]["k"]): r["value"]
        for r in analysis.rec.rows
        if r["metric"] == "knockout_removed" and r["condition"]["layer"] == 1
    }
    assert removed[(0, "all")] == 0.0  # layer 0 runs before the knockout
    assert removed[(1, "all")] == 0.0  # its own logits precede its pattern
    probe_rows = [r for r in analysis.rec.rows if r["metric"] == "knockout_probe_r2_log"]
    original = {r["layer"]: r["value"] for r in analysis.rec.rows if r["metric"] == "probe_r2_log"}
    assert [r["value"] for r in probe_rows][:2] == pytest.approx([original[0], original[1]])


def test_shift_test_is_zero_for_a_rope_layer_that_reads_only_relative_offsets():
    model = tiny_model(position="rope", n_layer=1)
    n, delta = 10, 13
    content = uniform_tokens(n=4, T=1 + n)
    filler = uniform_tokens(n=1, T=delta, seed=5).expand(4, -1)
    far = torch.cat([content[:, :1], filler, content[:, 1:]], dim=1)
    p = {}
    for name, toks in (("near", content), ("far", far)):
        p[name] = collect(model, toks, {"blocks.0.attn.pattern": keep})["blocks.0.attn.pattern"]
    from posleak.analysis.maths.measures import shift_distances

    assert shift_distances(p["near"], p["far"], 1, 1 + delta, n).max() < 1e-3


# what a full-attention RoPE run without a sink logit, without --ntk-scales and without a
# window to contrast cannot write (sink_gain: only heads above the sink threshold)
NOT_WRITTEN_HERE = {
    "abs_share_window",
    "band_c_res_content",
    "band_c_res_content_beyond",
    "band_c_res_content_floor",
    "band_frontier",
    "band_frontier_content",
    "band_probe_r2",
    "c_res_window",
    "c_res_window_floor",
    "c_res_window_hybrid_diff",
    "c_res_window_signed",
    "c_res_window_type",
    "probe_tail_r2_log",
    "ntk_loss_change",
    "ntk_probe_r2_log",
    "ntk_probe_refit_r2_log",
    "ntk_removed_v3",
    "ntk_removed_share",
    "sink_gain",
    "sink_virtual_mass",
}
METRIC_NAMES = set(sites()) - NOT_WRITTEN_HERE  # derived from the stages' declarations


def test_analyze_writes_tidy_v3_records_summary_and_figures(runs):
    summary = analyze(runs / "rope-s1", SMALL)
    out = runs / "rope-s1" / "analysis"
    rows = read(out / "records.jsonl")
    assert {r["metric"] for r in rows} - {"sink_gain"} == METRIC_NAMES
    assert all(tuple(r) == FIELDS for r in rows)
    assert {r["definitions"] for r in rows} == {4} and summary["definitions"] == 4
    assert {r["variant"] for r in rows} == {"rope"} and {r["seed"] for r in rows} == {1}
    assert summary["per_layer"]["fingerprint_dispersion_bos"] == {0: 0.0, 1: 0.0, 2: 0.0}
    assert (out / "report.png").stat().st_size > 10_000
    stored = json.loads((out / "analysis.json").read_text())
    assert stored["step"] == 6
    # paths are stored relative (the run to the folder, the checkpoint to the run), so a
    # copied tree of runs reads back its own paths
    assert stored["run"] == ".." and stored["checkpoint"] == "checkpoints/step_00000006"
    moved = runs.parent / "moved-runs" / "rope-s1"
    shutil.copytree(runs / "rope-s1", moved)
    back = AnalysisDir(moved / "analysis").read_summary()
    assert back["run"] == str(moved) and back["checkpoint"] == str(moved / stored["checkpoint"])
    shutil.rmtree(moved.parent)
    probe_rows = [r for r in rows if r["metric"] == "probe_r2_log"]
    assert all(r["lo"] <= r["value"] <= r["hi"] for r in probe_rows)
    lengths = {
        (r["condition"]["len"], r["condition"]["ntk"]) for r in rows if r["metric"] == "loss_mean"
    }
    assert {(32, "none"), (256, "none"), (256, "length ratio")} <= lengths


def test_the_usage_reference_documents_every_metric_name():
    reference = (ROOT / "docs" / "usage.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", reference, flags=re.M))
    assert set(sites()) <= documented


def test_compare_pairs_by_seed_and_says_when_there_are_too_few_seeds(runs, tmp_path):
    groups, summaries = load_groups(find_runs([str(runs)]), SMALL)
    assert {v: len(g) for v, g in groups.items()} == {"rope": 2, "nope": 2}
    report = write_report(groups, summaries, tmp_path / "report")
    text = report.read_text()
    assert "| metric | nope − rope |" in text
    assert "(n=2 < 3: no test)" in text and "] **finding**" not in text
    for png in re.findall(r"\(([a-z_0-9]+\.png)\)", text):
        assert (tmp_path / "report" / png).exists(), png
        assert (tmp_path / "report" / png).with_suffix(".svg").exists(), png


def test_compare_drops_rows_that_do_not_apply_and_keeps_constants_out_of_the_family():
    from posleak.analysis.reports.compare import difference_table

    def runs(**numbers):  # three seeds of one variant: {number: [value by seed]}
        return [{"seed": k, "headline": {n: v[k] for n, v in numbers.items()}} for k in range(3)]

    summaries = {
        "rope": runs(same=[0.5, 0.5, 0.5], shifted=[1.0, 2.0, 3.0], real=[1.0, 2.0, 3.0]),
        "nope": runs(same=[0.5, 0.5, 0.5], shifted=[1.5, 2.5, 3.5], real=[1.5, 2.4, 3.6]),
    }
    rows = [("same", "shared baseline"), ("shifted", "constant shift"), ("real", "measured")]
    text = "\n".join(difference_table(summaries, "rope", rows))
    assert "shared baseline" not in text  # 0 in every seed: a row that does not apply
    assert "| constant shift | 0.5 in every seed (n=3; constant: no test) |" in text
    measured = next(line for line in text.splitlines() if line.startswith("| measured"))
    p = measured.split(", p ")[1].split(",")[0]
    assert f"Holm {p}," in measured  # the only tested cell: Holm leaves its p as it is


def test_analysing_on_data_of_another_vocabulary_is_refused(runs):
    with pytest.raises(ValueError, match="special tokens"):
        analysis_of(runs / "rope-s0", Options(data="bible"))


@pytest.mark.parametrize(
    "bad", [dict(seqs=1), dict(seq_len=2), dict(seq_len=0), dict(rope_scale=0.0)]
)
def test_bad_analysis_options_are_refused_with_the_fix(runs, bad):
    with pytest.raises(ValueError, match="must be"):
        analysis_of(runs / "rope-s0", Options(**bad))


def test_rope_scale_at_analysis_time_composes_with_a_trained_ntk_scale():
    trained = Decoder(ModelConfig(position="rope_ntk", rope_scale=2.0, d_model=32, n_head=2))
    trained.set_rope_scale(4.0)
    assert trained.rope_effective_base == pytest.approx(ntk_base(10000.0, 8.0, 16))
    trained.set_rope_scale(1.0)
    assert trained.rope_effective_base == pytest.approx(ntk_base(10000.0, 2.0, 16))


def test_rope_scale_applies_ntk_scaling_at_analysis_time_on_longer_inputs(runs):
    analysis = analysis_of(runs / "rope-s0", Options(seqs=4, seq_len=64, rope_scale=4.0))
    assert analysis.model.rope_effective_base == ntk_base(10000.0, 4.0, 16)
    assert analysis.tokens(4, 64, "analysis").shape == (4, 65)  # twice the training length
    assert analysis.design(0).visible.shape == (64, 64)


def test_records_say_which_layer_count_they_use_and_load_as_a_dataframe(runs):
    from posleak.analysis.engine.records import load_records

    for run in ("nope-s0", "rope-s1"):
        if not (runs / run / "analysis" / "records.jsonl").exists():
            analyze(runs / run, SMALL)
    frame = load_records([runs / "nope-s0", runs / "rope-s1" / "analysis"])
    assert list(frame.columns)[: len(FIELDS)] == list(FIELDS)
    assert set(frame["run"]) == {"nope-s0", "rope-s1"}
    assert str(frame["layer"].dtype) == "Int64" and str(frame["seed"].dtype) == "Int64"
    swaps = frame[(frame.metric == "bos_swap_loss_change") & (frame["condition.queries"] == "all")]
    assert set(swaps["condition.swap"]) == set(SMALL.swaps)
    assert frame.groupby("condition", dropna=False).size().sum() == len(frame)
    from posleak.analysis.reports.results import headline_frame

    numbers = headline_frame([runs / "nope-s0", runs / "rope-s1"])
    probe = numbers[(numbers.number == "probe_r2_log_last") & (numbers.variant == "rope")]
    assert len(probe) == 1 and probe["value"].item() == pytest.approx(
        frame[(frame.run == "rope-s1") & (frame.metric == "probe_r2_log")]["value"].iloc[-1]
    )
    probe_rows = frame[frame.metric == "probe_r2_log"]
    assert set(probe_rows.site) == {"resid"} and set(probe_rows.layer) == {0, 1, 2}
    assert set(frame[frame.metric == "c_res"].site) == {"attn"}
    assert frame[frame.metric == "loss_mean"].site.isna().all()


def test_html_report_is_self_contained_and_every_figure_loads_in_a_browser(runs, tmp_path):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    groups, summaries = load_groups(find_runs([str(runs)]), SMALL)
    report = write_report(groups, summaries, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    expected = len(re.findall(r"!\[", report.read_text()))
    assert 'src="data:image/png;base64,' in page and '.png"' not in page  # nothing external
    counter = (
        "<script>addEventListener('load',()=>{const i=[...document.images];"
        "document.title=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length})</script>"
    )
    moved = tmp_path / "elsewhere" / "page.html"  # no folder of figures next to it
    moved.parent.mkdir()
    moved.write_text(page.replace("</body>", counter + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", moved.as_uri()], capture_output=True, text=True, timeout=600
    ).stdout
    assert f"<title>{expected}/{expected}</title>" in dom


def test_level_table_gives_a_t_interval_of_each_mean():
    from posleak.analysis.reports.compare import level_table

    def run(seed, loss):
        return {"seed": seed, "headline": {"val_loss": loss}}

    (row,) = level_table(
        {"rope": [run(0, 1.0), run(1, 2.0), run(2, 3.0)]}, [("val_loss", "validation loss")]
    )[2:]
    half = 4.302652730 * 1.0 / math.sqrt(3)
    assert row == f"| validation loss | 2 ± 1 [{2 - half:.4g}, {2 + half:.4g}] |"


def test_report_labels_follow_the_options_the_analysis_was_made_with(runs, tmp_path):
    opts = dataclasses.replace(SMALL, early_queries=8, sink_eps=0.2, swaps=("mean", "zeros"))
    for seed in (0, 1):
        analyze(runs / f"rope-s{seed}", opts, tmp_path / f"a{seed}")
    groups, summaries = load_groups(find_runs([str(tmp_path / "a0"), str(tmp_path / "a1")]), opts)
    text = write_report(groups, summaries, tmp_path / "report").read_text()
    assert "C_res² removed by BOS→mean, i < 8" in text and "BOS→token" not in text
    assert "sink rate, α₀ > 0.2" in text and "A_i0 at i < 8" in text
    assert "i < 16" not in text and "α₀ > 0.3" not in text
    layers = summaries["rope"][0]["per_layer"]
    assert "bos_swap_removed_mean_k8" in layers and "bos_swap_removed_mean_k16" not in layers
    headline = summaries["rope"][0]["headline"]
    assert NUMBERS["bos_swap_removed"].key(swap="zeros") in headline
    assert NUMBERS["bos_swap_removed"].key(swap="token") not in headline


def test_every_recorded_metric_is_declared_by_exactly_one_stage(runs):
    from posleak.analysis.engine.records import Recorder
    from posleak.analysis.stages import sites

    declared = sites()
    rows, _ = analysis_of(runs / "rope-s0", SMALL).run_all()
    assert {r["metric"] for r in rows} <= set(declared)
    assert all(r["site"] == declared[r["metric"]] for r in rows)
    with pytest.raises(KeyError, match="declared by no stage"):
        Recorder(declared).add("an_undeclared_metric", 1.0)


def test_flat_attention_reads_lift_one_and_alpha0_its_uniform_baseline_in_the_analysis(runs):
    """q = 0 in every layer: uniform attention, so lambda_0 = 1 exactly, alpha_0 equals its
    uniform baseline, and no head is a version-3 sink head."""
    analysis = analysis_of(runs / "rope-s0", SMALL)
    with torch.no_grad():
        for block in analysis.model.layers:
            block.self_attn.q_proj.weight.zero_()
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("sinks").run(analysis, ctx)
    stage("sink signatures").run(analysis, ctx)
    rows = analysis.rec.rows

    def values(metric):
        return [r["value"] for r in rows if r["metric"] == metric]

    assert values("sink_lift") == pytest.approx([1.0] * 4)
    uniform = values("sink_alpha0_uniform")[0]
    assert values("sink_alpha0") == pytest.approx([uniform] * 4)
    assert values("sink_rate_lifted") == [0.0, 0.0]
    assert all(v > 0 for v in values("massive_ratio") + values("value_drain"))
    assert not values("sink_virtual_mass")  # no sink logit in this model


def parked_with_flat_logits(run):
    """The run's analysis with every query zeroed (flat logits) and the mass on no key that
    the signatures stage then records, per head."""
    analysis = analysis_of(run, SMALL)
    with torch.no_grad():
        for block in analysis.model.layers:
            block.self_attn.q_proj.weight.zero_()
    ctx = analysis.context(analysis.tokens(8, analysis.T, "analysis"))
    stage("sink signatures").run(analysis, ctx)
    return analysis, [r["value"] for r in analysis.rec.rows if r["metric"] == "sink_virtual_mass"]


def test_the_mass_parked_on_a_sink_logit_is_read_per_head(tmp_path):
    """Softmax-off-by-one with flat logits: query i gives the virtual key 1 / (i + 2)."""
    run = tmp_path / "sink"
    train(build(tiny_overrides(model__sink="off_by_one", train__steps=2)), run)
    analysis, parked = parked_with_flat_logits(run)
    expected = sum(1 / (i + 2) for i in range(1, analysis.T)) / (analysis.T - 1)
    assert parked == pytest.approx([expected] * 4)


def test_softpick_and_a_gate_analyse_end_to_end_and_flat_softpick_gives_no_key_anything(tmp_path):
    """Every stage runs on a gated softpick model; with flat logits e^0 - 1 = 0 for every key,
    so softpick gives no key any weight: the mass on no key is 1 in every head."""
    run = tmp_path / "softpick"
    overrides = tiny_overrides(model__attention="softpick", model__gate=True, train__steps=2)
    train(build(overrides), run)
    analyze(run, SMALL, None)
    headline = AnalysisDir(run / "analysis").read_summary()["headline"]
    assert headline[NUMBERS["alpha0_max"].key()] is not None
    _, parked = parked_with_flat_logits(run)
    assert parked == pytest.approx([1.0] * 4, abs=1e-6)


def test_knockouts_report_a_bounded_refit_beside_the_transfer_and_run_their_controls(runs):
    analysis = analysis_of(runs / "nope-s0", SMALL)
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("probes").run(analysis, ctx)
    stage("key-0 knockout").run(analysis, ctx)
    rows = analysis.rec.rows

    def values(metric, condition):
        return [r["value"] for r in rows if r["metric"] == metric and r["condition"] == condition]

    for key in (0, 1, "random"):
        label = {"layer": "all", "key": key}
        refit, transfer = (
            values("knockout_probe_refit_r2_log", label),
            values("knockout_probe_r2_log", label),
        )
        assert len(refit) == len(transfer) == 3 and all(r <= 1 for r in refit)
        assert values("knockout_removed", {**label, "k": "all"})
    every = {"layer": "all", "key": 0}
    assert (
        values("knockout_probe_refit_r2_log", every)[-1]
        >= values("knockout_probe_r2_log", every)[-1]
    )


def test_the_window_contrast_reads_beyond_w_and_a_full_model_takes_its_comparators_w(runs):
    def contrast(opts):
        analysis = analysis_of(runs / "rope-s0", opts)
        ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
        stage("window contrast").run(analysis, ctx)
        return analysis.rec.rows

    assert contrast(SMALL) == []  # a full-attention model with no comparator: nothing to read
    rows = contrast(dataclasses.replace(SMALL, contrast_window=8))
    metrics = [r["metric"] for r in rows]
    assert metrics.count("c_res_window_signed") == 2 and metrics.count("c_res_window") == 1
    assert metrics.count("probe_tail_r2_log") == 3  # every residual site
    assert all(r["condition"] in ({"w": 8}, {"w": 8, "layers": "global"}) for r in rows)
    assert all(r["value"] <= 1 for r in rows if r["metric"] == "probe_tail_r2_log")
    assert Options(contrast_window=31).problems(32) and not Options(contrast_window=30).problems(32)


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


def test_the_key0_knockout_says_where_its_mass_went_as_the_patterns_themselves_do(runs):
    """The new strongest key per head and the most massive position after the knockout,
    against the knocked-out model's own cached patterns and states."""
    analysis = analysis_of(runs / "rope-s0", SMALL)
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("probes").run(analysis, ctx)
    stage("key-0 knockout").run(analysis, ctx)
    rows = analysis.rec.rows
    L = analysis.L
    knock = [
        (f"blocks.{l}.attn.pattern", lambda p, n: measures.knock_out_key0(p)) for l in range(L)
    ]
    names = [f"blocks.{l}.attn.pattern" for l in range(L)]
    names += [f"blocks.{l}.resid_post" for l in range(L)]
    with analysis.model.hooks(knock):
        _, cache = analysis.model.run_with_cache(ctx.tokens, names=names)
    for l in range(L):
        mass = cache[f"blocks.{l}.attn.pattern"].double().mean(-2).mean(0)[:, 1:]  # (H, T - 1)
        for h in range(analysis.H):
            mine = {r["metric"]: r["value"] for r in rows if r["layer"] == l and r["head"] == h
                    and r["metric"].startswith("knockout_top_key")}  # fmt: skip
            assert mine["knockout_top_key"] == int(mass[h].argmax()) + 1
            assert mine["knockout_top_key_mass"] == pytest.approx(float(mass[h].max()), rel=1e-6)
        x = cache[f"blocks.{l}.resid_post"].double()
        norms = x.norm(dim=-1)
        ratio = (norms / norms[:, 1:].median(-1, keepdim=True).values).mean(0)
        (found,) = [
            r for r in rows if r["metric"] == "knockout_massive_ratio" and r["layer"] == l + 1
        ]
        assert found["condition"]["position"] == int(ratio[1:].argmax()) + 1
        assert found["value"] == pytest.approx(float(ratio[1:].max()), rel=1e-6)


def test_attention_maps_record_the_top_heads_mean_pattern_and_draw_it(runs, tmp_path):
    import matplotlib.image as mpimg

    from posleak.analysis.stages.route2 import top_heads

    analysis = analysis_of(runs / "rope-s0", SMALL)
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("attention maps").run(analysis, ctx)
    rows = [r for r in analysis.rec.rows if r["metric"] == "attention_early"]
    heads = {(l, h) for l, h, _ in top_heads(analysis, ctx)}
    assert {(r["layer"], r["head"]) for r in rows} == heads
    names = [f"blocks.{l}.attn.pattern" for l, _ in heads]
    _, cache = analysis.model.run_with_cache(ctx.tokens[: SMALL.content_seqs], names=names)
    k = SMALL.early_queries
    for r in rows:
        pattern = cache[f"blocks.{r['layer']}.attn.pattern"].double()
        expected = pattern[:, r["head"], r["query"], r["condition"]["key"]].mean()
        assert r["value"] == pytest.approx(float(expected), abs=1e-6)
    assert len(rows) == len(heads) * k * (k + 1) // 2  # the causal triangle of i, j < k
    png = stage("attention maps").figures({"rope": [rows]}, tmp_path, SMALL)["attention"]
    assert mpimg.imread(tmp_path / png).std() > 0.05


def test_route2_and_head_interventions_run_on_the_top_heads_by_lift(runs):
    analysis = analysis_of(runs / "rope-s0", dataclasses.replace(SMALL, top_heads=2))
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("probes").run(analysis, ctx)
    stage("routes and head knockouts").run(analysis, ctx)
    rows = analysis.rec.rows
    refit = [r for r in rows if r["metric"] == "route2_probe_refit_r2_log"]
    labels = {json.dumps(r["condition"], sort_keys=True) for r in refit}
    assert len(labels) == 3 + 2 * 2  # the three routes in every head; two rules in two heads
    for rule in ("write", "mass", "value"):
        assert json.dumps({"heads": "all", "rule": rule}) in labels
    assert all(r["value"] <= 1 for r in refit) and len(refit) == 7 * 3
    losses = {(r["condition"]["rule"], r["condition"]["queries"]): r for r in rows
              if r["metric"] == "route_loss_change"}  # fmt: skip
    assert set(losses) == {
        (rule, q) for rule in ("write", "mass", "value") for q in ("early", "all")
    }
    assert all(r["lo"] <= r["value"] <= r["hi"] for r in losses.values())
    lifts = [r["value"] for r in rows if r["metric"] == "top_head_lift"]
    assert len(lifts) == 2 and lifts[0] >= lifts[1]


def test_the_difference_table_is_one_holm_family_and_names_the_mde_of_every_null():
    from posleak.analysis.maths.seeds import paired_difference
    from posleak.analysis.reports.compare import difference_table

    seeds = range(8)
    ref = [{"seed": s, "headline": {"x": 0.0, "y": 0.0, "z": 0.0}} for s in seeds]
    other = [
        {"seed": s, "headline": {"x": 1.0 + 0.01 * s, "y": 0.4 + 0.4 * (-1) ** s, "z": 0.0}}
        for s in seeds
    ]
    other[0]["headline"]["z"] = 0.35  # z: one seed moved; y: a marginal effect
    other[1]["headline"]["z"] = 0.30
    other[2]["headline"]["z"] = 0.25
    rows = [("x", "x"), ("y", "y"), ("z", "z")]
    text = "\n".join(difference_table({"rope": ref, "b": other}, "rope", rows))
    x_line, y_line, z_line = text.splitlines()[2:]
    assert "**finding**" in x_line and "Holm" in x_line
    d = paired_difference({s: other[s]["headline"]["y"] for s in seeds}, {s: 0.0 for s in seeds})
    assert d.finding and d.p < 0.05  # uncorrected, the interval excludes 0 ...
    assert "**finding**" not in y_line and "MDE" in y_line  # ... Holm over the family decides
    assert "not detected" in z_line


def test_the_verdict_figure_draws_each_tested_contrast_as_its_table_decides_it(tmp_path):
    import matplotlib.image as mpimg

    from posleak.analysis.maths.seeds import minimum_detectable, paired_difference
    from posleak.analysis.reports.verdicts import Verdicts, forest_figure, verdict_box

    seeds = range(6)
    big = {s: 1.0 + 0.1 * s for s in seeds}
    small = {s: 0.05 * (-1) ** s for s in seeds}
    zero = dict.fromkeys(seeds, 0.0)
    family = Verdicts([("big", big, zero), ("small", small, zero), ("one", {0: 1.0}, {0: 0.0})])
    rows = {row[0]: row for row in family.forest_rows()}
    assert set(rows) == {"big", "small"}  # one seed: not tested, not drawn
    d = paired_difference(small, zero)
    assert rows["big"][4] and rows["big"][5] is None
    assert rows["small"][1:4] == (d.mean, d.lo, d.hi) and not rows["small"][4]
    assert rows["small"][5] == pytest.approx(minimum_detectable(d.sd, d.n, 0.05 / 2))
    scaled = {row[0]: row for row in family.forest_rows(standardised=True)}
    assert scaled["small"][1] == pytest.approx(d.mean / d.sd)
    lines = forest_figure(family, tmp_path, "verdict", None, "a question")
    image = mpimg.imread(tmp_path / "verdict.png")
    assert lines[-1] == "![a question](verdict.png)" and image.std() > 0.05
    assert forest_figure(Verdicts([("one", {0: 1.0}, {0: 0.0})]), tmp_path, "x", "u", "t") == []
    box = "\n".join(verdict_box([("Q?", family)]))
    assert "**Q?** 1 of 2 tested contrasts are findings: big (**higher**" in box
    gated = Verdicts([("small", small, zero), ("big", big, zero)], primary=True)
    assert gated.summary().startswith("no finding (1 of 2 contrasts tested); small: not detected")


# ------------------------------------------------------------------ knockout loss (v3 item 7)
def planted_sink_subject(gain: float, T: int = 24, n: int = 16):
    """A one-head NoPE layer whose only non-zero value is BOS's and whose queries all score
    BOS high: A_i0 = e^{s_i} / (e^{s_i} + i) and the head adds A_i0 * gain * n_0 e_4, in
    closed form (no MLP). Returns the subject and the closed-form mean loss change of each
    knockout rule, over all targets and over the targets the planted copy mask marks."""
    from posleak.analysis.engine.collect import Subject

    V, d, bos = 13, 8, 10
    model = blank_one_head_model(vocab_size=V, d_model=d, position="nope")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer = model.layers[0]
        emb = torch.zeros(V, d)
        emb[:bos, 1] = 1.0
        emb[:bos, 2:] = 0.5 * torch.randn(bos, d - 2, generator=gen)
        emb[bos, 0] = 3.0
        model.embed_tokens.weight.copy_(emb)
        attn = layer.self_attn
        attn.q_proj.weight[2, 1] = 1.6
        attn.k_proj.weight[2, 0] = 1.6
        attn.v_proj.weight[3, 0] = 1.0
        attn.o_proj.weight[4, 3] = gain
        unembed = torch.randn(V, d, generator=gen)
        unembed[:, 4] = 0.0
        unembed[bos:, 4] = -3.0  # the sink's output lowers the specials: it helps every target
        model.lm_head.weight.copy_(unembed)
    body = torch.randint(0, bos, (n, T + 1), generator=gen)
    tokens = torch.cat([torch.full((n, 1), bos), body[:, 1:]], dim=1)  # (n, T + 1)
    marked = lambda t: (t % 2 == 0) & (t < bos)  # noqa: E731  a stand-in copy mask

    def rms(x):
        return x / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()

    x = emb.double()[tokens[:, :T]]  # (n, T, d)
    normed = rms(x)
    score = (1.6 * normed[..., 1]) * (1.6 * normed[:, :1, 0]) / math.sqrt(d)  # s_i0
    i = torch.arange(T, dtype=torch.float64)
    a0 = torch.exp(score) / (torch.exp(score) + i)  # ordinary keys score 0
    a0[:, 0] = 1.0
    keys = measures.random_earlier_keys(T, None, 0)

    def loss(a):
        out = x.clone()
        out[..., 4] += a * gain * normed[:, :1, 0]
        logits = rms(out) @ model.lm_head.weight.double().T
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")

    base = loss(a0).view(n, T)
    other = 1.0 / (torch.exp(score) + i)  # the weight of any one ordinary key
    knocked = {"key=0": torch.where(i >= 1, 0.0, a0)}
    knocked["key=1"] = torch.where(i > 1, a0 / (1 - other), a0)
    knocked["key=random"] = torch.where(i >= 1, a0 / (1 - other), a0)  # an ordinary key
    mask = torch.from_numpy(marked(tokens.numpy())[:, 1:])
    expected = {}
    for label, a in knocked.items():
        change = loss(a).view(n, T) - base
        expected[label, "all"] = change.mean().item()
        expected[label, "copy"] = change[mask].mean().item()
        expected[label, "other"] = change[~mask].mean().item()
    subject = Subject(
        model=model.eval(),
        name="planted",
        label={"variant": "planted", "seed": 0},
        train_len=T,
        bos="always",
        seed=0,
        data="planted",
        draw=lambda k, L, b, s: tokens[:k, : L + 1],
        info={},
        copy_targets=lambda t: marked(t),
    )
    assert keys.min() >= 0
    return subject, expected


KEY_OF = {"key=0": 0, "key=1": 1, "key=random": "random"}  # the closed form's labels


@pytest.mark.parametrize("gain", [0.0, 4.0])
def test_knockout_loss_recovers_a_planted_sinks_closed_form_and_zero_without_one(gain):
    from posleak.analysis.engine.analyze import Analysis

    subject, expected = planted_sink_subject(gain)
    analysis = Analysis(subject, dataclasses.replace(SMALL, seqs=16))
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("probes").run(analysis, ctx)
    stage("key-0 knockout").run(analysis, ctx)  # its every-layer passes carry the losses
    stage("knockout loss").run(analysis, ctx)
    got = {
        tuple(r["condition"][f] for f in ("key", "heads", "targets")): r
        for r in analysis.rec.rows
        if r["metric"] == "knockout_loss_change"
    }
    (heads,) = [r["value"] for r in analysis.rec.rows if r["metric"] == "knockout_sink_heads"]
    assert heads == 1  # the planted head is a sink: alpha_0 > 0.3 and lambda_0 >= 5
    for (label, group), value in expected.items():
        row = got[KEY_OF[label], "all", group]
        assert row["value"] == pytest.approx(value, abs=2e-5)
        if gain == 0:
            assert value == 0 and abs(row["value"]) < 1e-6  # no value to remove: no change
    if gain:
        assert expected["key=0", "all"] > 0.01  # the planted effect is clear...
        row = got[0, "all", "all"]
        assert row["lo"] > 0  # ...and its interval excludes 0
        excess = got[EXCESS, "all", "all"]["value"]
        assert excess == pytest.approx(
            expected["key=0", "all"] - expected["key=random", "all"], abs=2e-5
        )
    # one layer, one head: the sink-head knockout is the every-layer one
    assert got[0, "sinks", "all"]["value"] == pytest.approx(got[0, "all", "all"]["value"], abs=1e-9)


def test_analysis_progress_names_each_stage_with_an_eta_from_its_planned_work(caplog):
    import logging

    from posleak.analysis.engine.progress import Progress

    progress = Progress({"base pass": 100, "probes": 300}, every=0.0, bar=False)
    with caplog.at_level(logging.INFO, logger="posleak"):
        progress.stage("base pass")
        progress.forwarded(100)
        progress.stage("probes")
        progress.forwarded(150)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("[analyze] base pass (1/2) | 0% of forward tokens")
    assert lines[0].endswith("eta ?")  # nothing forwarded yet: no rate
    assert "probes (2/2) | 25%" in lines[2] and "| 62%" in lines[3]
    assert progress.eta() == pytest.approx(
        (time.perf_counter() - progress.started) / 250 * 150, rel=0.05, abs=0.01
    )
    assert all("eta 0:" in line for line in lines[1:])


def test_the_progress_counts_every_pass_the_stages_planned(runs):
    """The ETA rests on tokens forwarded against Stage.work: passes without logits (which
    skip the output projection) count too, so the count ends near the plan."""
    analysis = analysis_of(runs / "rope-s0", SMALL)
    analysis.run_all()
    progress = analysis.progress
    assert 0.5 * progress.total <= progress.done <= 1.5 * progress.total, (
        progress.done,
        progress.total,
    )


def test_knockout_headline_is_none_where_a_knocked_probe_is_undefined():
    layers = {
        "probe_r2_log": {0: 0.0, 1: 0.9},
        "knockout_probe_r2_log": {0: 0.0, 1: None},  # R^2 of a degenerate fit: not a number
        "knockout_probe_refit_r2_log": {},
        "knockout_probe_refit_r2_log_key1": {},
    }
    drop = NUMBERS["knockout_probe_r2_log_drop"]
    assert drop.value([], layers, SMALL, {}) is None
    layers["knockout_probe_r2_log"][1] = 0.4
    drop = drop.value([], layers, SMALL, {})
    assert drop == pytest.approx(0.5)


def test_the_shared_pass_gives_the_loss_of_the_models_own_logits():
    """stream(..., targets): the loss comes from the final states through the output
    projection in token slices; it equals cross-entropy of the full forward's logits."""
    from posleak.analysis.engine.collect import stream, token_losses

    model = tiny_model(position="rope", n_layer=2).eval()
    tokens = torch.randint(0, 23, (5, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    got = stream(model, tokens[:, :-1], {}, 2, targets=tokens[:, 1:])
    assert got.shape == (5, 16) and got.dtype == torch.float64
    assert torch.allclose(got.float().flatten(), expected, atol=1e-5)
    assert torch.equal(token_losses(model, tokens, 1 << 20), got)


def test_ntk_at_inference_is_read_against_the_base_pass_on_the_same_sequences(runs):
    """The stage's loss change equals the loss of the model run at scale s minus at scale 1,
    computed directly from its logits; a scale that changes nothing (s = 1 + 1e-12) removes
    nothing and changes no loss; the model is left at its own scale; NoPE records nothing."""
    opts = dataclasses.replace(SMALL, ntk_scales=(4.0, 1 + 1e-12))
    analysis = analysis_of(runs / "rope-s0", opts)
    model = analysis.model
    with torch.no_grad():  # sharp attention, so that the rotation matters to the loss
        for block in model.layers:
            block.self_attn.q_proj.weight.mul_(30.0)
            block.self_attn.k_proj.weight.mul_(30.0)
    tokens = analysis.tokens(16, analysis.T, "analysis")
    ctx = analysis.context(tokens)
    stage("probes").run(analysis, ctx)
    stage("NTK at inference").run(analysis, ctx)
    assert model.rope_inference_scale == 1.0

    def mean_loss(scale):
        model.set_rope_scale(scale)
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        model.set_rope_scale(1.0)
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()

    rows = {(r["metric"], json.dumps(r["condition"], sort_keys=True)): r for r in analysis.rec.rows}
    change = rows["ntk_loss_change", json.dumps({"queries": "all", "s": 4.0})]
    assert change["value"] == pytest.approx(mean_loss(4.0) - mean_loss(1.0), abs=1e-5)
    assert abs(change["value"]) > 3e-4 and change["lo"] <= change["value"] <= change["hi"]
    none = rows["ntk_loss_change", json.dumps({"queries": "all", "s": 1 + 1e-12})]
    assert abs(none["value"]) < 1e-9
    tiny = json.dumps(1 + 1e-12)
    removed = [r for (m, c), r in rows.items() if m == "ntk_removed_v3" and f'"s": {tiny}' in c]
    assert removed and all(abs(r["value"]) < 1e-6 for r in removed)
    refit = [
        r
        for r in analysis.rec.rows
        if r["metric"] == "ntk_probe_refit_r2_log" and r["condition"] == {"s": 4.0}
    ]
    assert len(refit) == 1 + analysis.L and all(r["value"] <= 1 for r in refit)  # every site
    nope = analysis_of(runs / "nope-s0", opts)
    nope_ctx = nope.context(nope.tokens(16, nope.T, "analysis"))
    stage("NTK at inference").run(nope, nope_ctx)
    assert not [r for r in nope.rec.rows if r["metric"].startswith("ntk_")]
    assert Options(ntk_scales=(1.0,)).problems(32)


def drawn(fig) -> list[int]:
    """How many artists hold data in each panel of a figure (colour bars aside)."""
    counts = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        lines = sum(1 for line in ax.get_lines() if len(line.get_xdata()) > 0)
        fills = sum(1 for c in ax.collections if len(c.get_paths()) or len(c.get_offsets()))
        images = len(ax.get_images())
        bars = sum(1 for p in ax.patches if p.get_height() != 0)
        counts.append(lines + fills + images + bars)
    return counts


def test_every_figure_a_comparison_links_draws_something_in_every_panel(runs, tmp_path):
    """A figure that asks for rows nobody recorded draws an empty panel (the shift figure once
    asked for a condition its rows did not carry); every panel must hold data."""
    from posleak.analysis.reports import plots

    seen, save = {}, plots.save

    def recording(fig, path):
        seen[Path(path).with_suffix(".png").name] = drawn(fig)
        return save(fig, path)

    plots.save = recording
    try:
        groups, summaries = load_groups(find_runs([str(runs)]), SMALL)
        text = write_report(groups, summaries, tmp_path / "report").read_text()
    finally:
        plots.save = save
    linked = re.findall(r"\(([a-z_0-9]+\.png)\)", text)
    assert linked and set(linked) <= set(seen)
    empty = {name: counts for name, counts in seen.items() if not all(counts)}
    assert not empty, empty


def test_reuse_requires_the_checkpoint_the_run_holds_now(tmp_path):
    """An analysis is reused only of the checkpoint it read: a run resumed to a later step,
    or retrained in the same folder, is analysed again (it used to be reported with the old
    step's numbers)."""
    from posleak.analysis.engine.reuse import is_current

    run = tmp_path / "rope-s0"
    train(build(tiny_overrides(train__steps=8)), run)
    first = analyze(run, SMALL)
    assert first["step"] == 8 and first["checkpoint_digest"]
    assert is_current(AnalysisDir(run / "analysis").read_summary(), SMALL)
    train(build(tiny_overrides(train__steps=12)), run, resume=True)
    assert not is_current(AnalysisDir(run / "analysis").read_summary(), SMALL)
    _, summaries = load_groups([run], SMALL, exact=True)
    assert summaries["rope"][0]["step"] == 12
    assert is_current(AnalysisDir(run / "analysis").read_summary(), SMALL)
    kept = shutil.move(run / "analysis", tmp_path / "kept")
    shutil.rmtree(run)
    train(build(tiny_overrides(train__steps=12, seed=1)), run)  # same step, other weights
    shutil.move(kept, run / "analysis")
    assert not is_current(AnalysisDir(run / "analysis").read_summary(), SMALL)


def test_the_same_run_twice_is_refused_not_pooled(runs, tmp_path):
    """Two copies of one trained run are one seed, not two: told apart by the checkpoint's
    weights digest, whatever their folders are called."""
    copy = tmp_path / "rope-s7"
    shutil.copytree(runs / "rope-s0", copy)
    analyze(runs / "rope-s0", SMALL)
    analyze(copy, SMALL)
    with pytest.raises(ValueError, match="hold the same trained model"):
        load_groups(find_runs([str(runs / "rope-s0"), str(copy)]), SMALL)


def test_analyses_in_parallel_give_the_records_of_analyses_in_turn(tmp_path, caplog):
    """`--jobs 2`: worker processes of one thread each write what the same analyses write
    one after another in one thread, bit for bit, and one progress line
    per finished analysis counts them over the whole batch."""
    import logging

    for seed in (0, 1):
        train(build(tiny_overrides(seed=seed)), tmp_path / f"rope-s{seed}")
    runs = [tmp_path / "rope-s0", tmp_path / "rope-s1"]

    def records() -> list[str]:
        rows = [r for run in runs for r in read(run / "analysis" / "records.jsonl")]
        return sorted(json.dumps(r, sort_keys=True) for r in rows)

    with caplog.at_level(logging.INFO, logger="posleak"):
        load_groups(runs, SMALL, jobs=2)
    parallel = records()
    assert "analysed 2/2" in caplog.text
    for run in runs:
        shutil.rmtree(run / "analysis")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums depend on the thread count: compare like with like
    try:
        load_groups(runs, SMALL, jobs=1)
    finally:
        torch.set_num_threads(threads)
    assert records() == parallel


def test_an_analysis_records_the_code_and_packages_that_made_it(runs, tmp_path):
    import subprocess

    summary = analyze(runs / "rope-s0", SMALL, tmp_path / "a")
    made = summary["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode == 0:  # a checkout (CI clones one)
        assert made["commit"] == head.stdout.decode().strip() and made["dirty"] in (True, False)
    assert made["packages"]["torch"] == torch.__version__.split("+")[0] or made["packages"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    groups, summaries = load_groups(find_runs([str(tmp_path / "a")]), SMALL)
    text = write_report(groups, summaries, tmp_path / "report").read_text()
    assert f"torch {made['packages']['torch']}" in text


def test_alpha0_maps_are_centred_on_each_layers_uniform_share(tmp_path):
    """A head that attends to key 0 exactly as uniform attention would is neutral in its own
    layer, whatever that layer's uniform share (a window raises it): α₀ is drawn minus the
    layer's recorded baseline on a map symmetric about 0."""
    import numpy as np

    from posleak.analysis.reports import plots

    def row(metric, value, layer, head=None):
        return dict(metric=metric, value=value, layer=layer, head=head, query=None, condition=None)

    uniform = {0: 0.02, 1: 0.20}  # a full layer and a windowed one
    rows = [row("sink_alpha0_uniform", u, l) for l, u in uniform.items()]
    rows += [row("sink_alpha0", uniform[l], l, h) for l in (0, 1) for h in (0, 1)]
    rows[-1]["value"] = 0.70  # one sink head in layer 1
    seen, save = {}, plots.save

    def recording(fig, path):
        seen["image"] = fig.axes[0].get_images()[0]
        return save(fig, path)

    plots.save = recording
    try:
        plots.head_maps(
            tmp_path / "a", {"v": [rows]}, "sink_alpha0", "α₀", baseline="sink_alpha0_uniform"
        )
    finally:
        plots.save = save
    image = seen["image"]
    grid = image.get_array()
    assert np.allclose(grid, [[0, 0], [0, 0.5]])  # the uniform heads are 0 in both layers
    assert np.allclose(image.get_clim(), (-0.5, 0.5)) and image.get_cmap().name == "RdBu_r"
