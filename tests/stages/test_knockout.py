"""The key-0 knockout stage (analysis/stages/knockout.py)."""

import pytest
from conftest import SMALL

from posleak.analysis.engine.analyze import analysis_of
from posleak.analysis.maths import measures
from posleak.analysis.stages import NUMBERS, stage
from posleak.analysis.stages.knockout import knock_out


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
