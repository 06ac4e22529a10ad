"""Route 2 and the head interventions (analysis/stages/route2.py)."""

import dataclasses
import json

from conftest import (
    SMALL,
)

from posleak.analysis.engine.analyze import analysis_of
from posleak.analysis.stages import stage


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
