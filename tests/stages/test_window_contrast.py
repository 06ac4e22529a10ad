"""The window contrast (analysis/stages/window_contrast.py)."""

import dataclasses

from conftest import (
    SMALL,
)

from posleak.analysis.engine.analyze import Options, analysis_of
from posleak.analysis.stages import stage


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
