"""The sink stage (analysis/stages/sinks.py): α₀, λ₀ and mass parked on no key."""

import pytest
import torch
from conftest import SMALL, parked_with_flat_logits, tiny_overrides

from posleak.analysis.engine.analyze import analysis_of, analyze
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.stages import NUMBERS, stage
from posleak.train.config import build
from posleak.train.loop import train


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
