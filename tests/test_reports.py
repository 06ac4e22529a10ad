"""The comparison report: tables paired by seed, one Holm family, figures that draw, HTML."""

import dataclasses
import math
import re
import shutil
from pathlib import Path

import pytest
from conftest import (
    SMALL,
)

from posleak.analysis.engine.analyze import analyze
from posleak.analysis.reports.compare import find_runs, load_groups, write_report
from posleak.analysis.stages import NUMBERS


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
    assert row == f"| validation loss | 2 ± 1 [{2 - half:.3g}, {2 + half:.3g}] |"


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


def test_the_same_run_twice_is_refused_not_pooled(runs, tmp_path):
    """Two copies of one trained run are one seed, not two: told apart by the checkpoint's
    weights digest, whatever their folders are called."""
    copy = tmp_path / "rope-s7"
    shutil.copytree(runs / "rope-s0", copy)
    analyze(runs / "rope-s0", SMALL)
    analyze(copy, SMALL)
    with pytest.raises(ValueError, match="hold the same trained model"):
        load_groups(find_runs([str(runs / "rope-s0"), str(copy)]), SMALL)


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
