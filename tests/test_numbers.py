"""Reported numbers (analysis/engine/numbers.py): declared once by a stage, read back by name
everywhere; a misspelt name or condition fails loudly; values come from the records."""

import pytest

from posleak.analysis.engine.numbers import Catalogue, Reported
from posleak.analysis.engine.options import Options
from posleak.analysis.engine.summary import run_report
from posleak.analysis.reports import results
from posleak.analysis.stages import NUMBERS, STAGES


def row(metric, value, layer=None, condition=None, head=None, query=None):
    return {"metric": metric, "value": value, "layer": layer, "head": head, "query": query,
            "condition": condition}  # fmt: skip


def test_a_misspelt_number_or_condition_raises_with_what_exists():
    with pytest.raises(KeyError, match="no reported number 'bos_swap_removd'.*bos_swap_removed"):
        results.headline("bos_swap_removd")
    with pytest.raises(KeyError, match=r"indexed by \['part', 'swap'\], not \['prt', 'swap'\]"):
        results.headline("bos_swap_removed_v3", swap="mean", prt="rest")
    with pytest.raises(KeyError, match="indexed by nothing"):
        results.value({"headline": {}}, "probe_r2_log_last", layer=3)
    with pytest.raises(RuntimeError, match="declared twice"):
        Catalogue([Reported("x", "x"), Reported("x", "y")])


def test_values_are_read_from_the_records_by_declared_condition_and_reduction():
    number = Reported("m", "m at {part}", conditions={"part": ("a", "b")}, reduce="last")
    rows = [
        row("m", 1.0, layer=0, condition={"part": "a"}),
        row("m", 2.0, layer=1, condition={"part": "a"}),
        row("m", 5.0, layer=1, condition={"part": "b"}),
        row("m", 9.0, layer=1, condition={"part": "a"}, head=0),  # a head's: not pooled
    ]
    assert number.value(rows, {}, Options(), {"part": "a"}) == 2.0
    assert number.value(rows, {}, Options(), {"part": "b"}) == 5.0
    assert number.key(part="a") == "m[part=a]"
    windowed = Reported("w", "w", parameters=("w",))  # a setting, not an index
    assert windowed.value([row("w", 3.0, condition={"w": 16})], {}, Options(), {}) == 3.0
    fixed = Reported("f", "f", where={"layer": "all"}, conditions={"key": (0, 1)})
    rows = [
        row("f", 1.0, condition={"layer": "all", "key": 1}),
        row("f", 7.0, condition={"layer": 2, "key": 1}),
    ]
    assert fixed.value(rows, {}, Options(), {"key": 1}) == 1.0
    mean = Reported("c", "c", curve="curve", reduce="mean_from_1")
    assert mean.value([], {"curve": {0: 10.0, 1: 1.0, 2: 3.0}}, Options(), {}) == 2.0


def test_conditions_follow_the_options_and_labels_are_formatted_from_them():
    opts = Options(swaps=("mean", "zeros"), early_queries=8)
    number = NUMBERS["bos_swap_loss_change"]
    assert [c["swap"] for c in number.values_of(opts)] == ["mean", "mean", "zeros", "zeros"]
    title = NUMBERS["c_res_early"].title(opts)
    assert "1–7" in title
    assert NUMBERS["val_loss"].title(opts) == "validation loss (nats)"


def test_every_stage_declares_numbers_whose_records_its_metrics_name():
    """A number read from records names a metric some stage declares (a typo there would
    read None forever)."""
    declared = {m for stage in STAGES for m in stage.metrics} | {"val_loss"}
    for number in NUMBERS:
        if number.compute is None and number.curve is None:
            assert number.source in declared, number.name


def test_the_per_run_report_shows_every_stage_that_drew_a_curve():
    summary = {
        "run": "r", "variant": "v", "seed": 0, "step": 3, "seqs": 8, "seq_len": 16,
        "data": "markov", "bos": "always", "definitions": 3, "val_loss": 1.5,
        "options": {}, "headline": {"val_loss": 1.5, "shift_js": 0.25},
        "per_layer": {"shift_js": {"0": 0.2, "1": 0.3}, "massive_ratio": {"0": 1.0}},
    }  # fmt: skip
    text = run_report(summary, "report.png")
    assert "| validation loss (nats) | 1.5000 |" in text
    assert "| shift-test JS distance (mean over layers) | 0.25 |" in text
    assert "## shift test" in text and "| 1 | 0.3 |" in text
    assert "## sink signatures" in text


def test_columns_of_numbers_are_right_aligned_in_markdown_and_html(tmp_path):
    from posleak.analysis.reports.html import to_html
    from posleak.report import table

    rows = [["rope", "0.5 [0.4, 0.6] (n=3)", "−2.1%", "a finding"], ["nope", "–", "3e-05", "–"]]
    lines = table(["variant", "C²", "share", "verdict"], rows)
    assert lines[1] == "|---|---:|---:|---|"  # words, and a column of dashes, stay left
    assert table(["x"], [["–"], ["–"]])[1] == "|---|"
    page = to_html("\n".join(lines), tmp_path, "t")
    assert '<td>rope</td><td class="num">0.5 [0.4, 0.6] (n=3)</td>' in page
    assert "td.num{text-align:right}" in page
