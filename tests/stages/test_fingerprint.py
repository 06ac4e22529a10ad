"""The position-0 fingerprint stage (analysis/stages/fingerprint.py)."""

from conftest import SMALL

from posleak.analysis.engine.analyze import analysis_of
from posleak.analysis.stages import stage


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
