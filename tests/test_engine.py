"""The analysis engine: the shared pass, records, options, reuse, progress and provenance."""

import dataclasses
import json
import math
import re
import shutil
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SMALL, tiny_model, tiny_overrides, uniform_tokens

from posleak.analysis.engine.analyze import Options, analysis_of, analyze
from posleak.analysis.engine.collect import stream
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.records import FIELDS, read
from posleak.analysis.maths.measures import knock_out_key0
from posleak.analysis.reports.compare import find_runs, load_groups, write_report
from posleak.analysis.stages import sites, stage
from posleak.analysis.stages._hooks import on_heads
from posleak.model import Decoder, ModelConfig
from posleak.model.rope import apply_rope, ntk_base, rope_tables
from posleak.train.config import build
from posleak.train.loop import train


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
    assert back["per_layer"] == summary["per_layer"]  # layers are ints again, as written
    assert list(stored["per_layer"]["fingerprint_dispersion_bos"]) == ["0", "1", "2"]
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
    trained = Decoder(ModelConfig(position="rope_ntk", params={"scale": 2.0}, d_model=32, n_head=2))
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


def test_every_recorded_metric_is_declared_by_exactly_one_stage(runs):
    from posleak.analysis.engine.records import Recorder
    from posleak.analysis.stages import sites

    declared = sites()
    rows, _ = analysis_of(runs / "rope-s0", SMALL).run_all()
    assert {r["metric"] for r in rows} <= set(declared)
    assert all(r["site"] == declared[r["metric"]] for r in rows)
    with pytest.raises(KeyError, match="declared by no stage"):
        Recorder(declared).add("an_undeclared_metric", 1.0)


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


def test_interventions_started_at_their_first_block_give_the_records_of_whole_passes(
    runs, tmp_path, monkeypatch
):
    """The base pass keeps every block's input; an intervention whose hooks sit in blocks >= f
    starts at block f. Every head of both layers gets its own knockout and write route, so
    passes start at block 1, and the records equal, bit for bit as sets, those of whole passes
    (--layer-cache-mb 0): the work is the same arithmetic on the same batches."""
    import posleak.analysis.engine.analyze as engine

    starts = []

    def spy(*args):
        starts.append(args[6][0] if args[6] else 0)
        return stream(*args)

    monkeypatch.setattr(engine, "stream", spy)
    opts = dataclasses.replace(SMALL, stages=("route2", "knockout", "bos_swap"), top_heads=4)

    def records(**changes) -> list[str]:
        out = tmp_path / str(changes)
        analyze(runs / "rope-s1", dataclasses.replace(opts, **changes), out)
        rows = read(out / "records.jsonl")
        return sorted(json.dumps(r, sort_keys=True) for r in rows if r["metric"] != "seconds")

    whole = records(layer_cache_mb=0)
    assert set(starts) == {0}
    starts.clear()
    started = records()
    assert starts.count(1) == 4  # the knockout and the write route of layer 1's two heads
    assert started == whole


def test_a_pass_started_at_its_block_equals_the_whole_pass_field_by_field(runs):
    """The same, on one pass of an untrained-looking model (every layer has logit structure):
    a single-head knockout in block 1, from the kept inputs and whole, compared field by field
    (logit statistics and sums of every layer, both probes' R² at every site, the losses)."""
    analysis = analysis_of(runs / "nope-s0", dataclasses.replace(SMALL, seqs=8))
    ctx = analysis.context(analysis.tokens(8, analysis.T, "analysis"))
    stage("probes").run(analysis, ctx)
    knock = [("blocks.1.attn.pattern", on_heads(lambda p: knock_out_key0(p), [1]))]

    def one_pass():
        return analysis.measure(ctx.tokens, knock, fitted=ctx.fitted, targets=ctx.targets)

    started = one_pass()
    analysis.layer_inputs = []  # nothing kept: the whole pass
    whole = one_pass()
    for l in range(analysis.L):
        for a, b in zip(started.logits[l], whole.logits[l], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(started.sums[l].sums, whole.sums[l].sums)
    assert started.probe_r2_log == whole.probe_r2_log
    assert started.probe_refit_r2_log == whole.probe_refit_r2_log
    assert torch.equal(started.losses, whole.losses)
    assert not torch.equal(whole.losses, ctx.base.losses)  # it did knock a head out
