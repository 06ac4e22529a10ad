"""NTK scaling at inference (analysis/stages/ntk_inference.py)."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SMALL,
)

from posleak.analysis.engine.analyze import Options, analysis_of
from posleak.analysis.stages import stage


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
