"""The attention maps of the top heads (analysis/stages/attention_maps.py)."""

import pytest
from conftest import SMALL

from posleak.analysis.engine.analyze import analysis_of
from posleak.analysis.stages import stage


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
