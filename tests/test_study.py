"""The study pipeline end to end: study-small.toml at a tiny budget, swept, analysed and
reported; and the report's verdicts against hand-made paired numbers."""

import math
import os
import subprocess
import sys
from pathlib import Path

from posleak.analysis.study import deep_c_res, depth_slope, verdict

ROOT = Path(__file__).resolve().parent.parent
TINY = """
[set]
model.n_layer = 3
model.d_model = 32
model.n_head = 2
data.seq_len = 32
train.batch_size = 4
train.steps = 8
train.warmup = 2
train.eval_every = 4
train.eval_batches = 2
train.ckpt_every = 4
train.log_every = 4
train.precision = "fp32"
log.progress = false
"""


def posleak(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "posleak", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def sweep_and_report(tmp_path, spec: str) -> tuple[str, Path]:
    """Sweep `spec` at --jobs 2, write `posleak study`'s report on 8 sequences: its text and
    the sweep folder."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(spec)
    out = tmp_path / "sweep"
    done = posleak("sweep", sweep, "--out", out, "--jobs", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    report = posleak("study", out, "--out", tmp_path / "report", "--seqs", "8")
    assert report.returncode == 0, report.stderr[-2000:]
    return (tmp_path / "report" / "report.md").read_text(), out


def test_study_small_runs_end_to_end_at_a_tiny_budget(tmp_path):
    spec = (ROOT / "configs/sweeps/study-small.toml").read_text()
    spec = spec.replace('base = "../', f'base = "{ROOT / "configs"}/')
    spec = spec.replace("train.steps = 200", "train.steps = 8")  # Markov's own budget
    text, out = sweep_and_report(tmp_path, spec + TINY)
    assert "from the records of 19 finished runs (of 19 planned) in 9 variants" in text
    sections = ("## (a)", "## (b)", "## (c)", "Sink emergence", "4× its training length")
    for claim in (*sections, "Length extrapolation", "Training: loss curves", "## Scale"):
        assert claim in text, claim
    assert "| markov-nope |" in text and "| sink |" in text
    assert text.count("not detected at this scale") + text.count("**") >= 3
    assert not (tmp_path / "report" / "comparison").exists()  # the comparison is compare's
    assert (tmp_path / "report" / "emergence.png").exists()
    steps = sorted(p.name for p in (out).glob("rope-s0-*/analysis-step*"))
    assert steps == ["analysis-step4"]  # every kept checkpoint but the last (the base analysis)


def test_verdicts_follow_the_paired_interval():
    ref = {0: 1.0, 1: 2.0, 2: 3.0}
    assert verdict({0: 1.5, 1: 2.4, 2: 3.6}, ref).startswith("**higher**")
    assert verdict({0: 0.5, 1: 1.6, 2: 2.4}, ref).startswith("**lower**")
    assert verdict({0: 1.5, 1: 1.5, 2: 3.1}, ref).startswith("not detected at this scale")
    assert "not tested" in verdict({0: 9.0, 1: 9.0}, ref)
    assert depth_slope({"per_layer": {"c_res_early": {"0": 1.0, "1": 3.0, "2": 5.0}}}) == 2.0
    assert math.isclose(
        depth_slope({"per_layer": {"c_res_early": {"0": 1.0, "1": 1.0, "2": 1.0}}}), 0.0
    )


def test_removed_shares_are_set_against_zero_and_the_source_studys_forty_percent():
    from posleak.analysis.study import _against_source, level
    from posleak.report import mean_interval

    wide = mean_interval([0.1, 0.4, 0.7])  # mean 0.4, t-interval [-0.345, 1.145]
    assert "includes 0 and includes the source study's 40%" in _against_source(wide)
    tight = mean_interval([0.10, 0.11, 0.12])
    assert "excludes 0 and excludes the source study's 40%" in _against_source(tight)
    assert level({0: 0.10, 1: 0.11, 2: 0.12}, percent=True) == "11% [9%, 13%] (n=3)"
    assert level({0: 0.5}) == "0.5 (n=1)" and level({}) == "–"


def test_deep_c_res_reads_only_layers_from_two_on():
    planted = {"per_layer": {"c_res_early": {"0": 9.0, "1": 9.0, "2": 0.3, "3": 0.5}}}
    assert math.isclose(deep_c_res(planted), 0.4)  # the planted deep signal, early layers ignored
    nothing = {"per_layer": {"c_res_early": {"0": 0.7, "1": 0.0, "2": 0.0, "3": 0.0}}}
    assert deep_c_res(nothing) == 0.0
    assert deep_c_res({"per_layer": {"c_res_early": {"0": 1.0, "1": 1.0}}}) is None


def test_the_sink_study_runs_end_to_end_at_a_tiny_budget(tmp_path):
    spec = (ROOT / "configs/sweeps/sinks.toml").read_text()
    spec = spec.replace('base = "../', f'base = "{ROOT / "configs"}/')
    spec = spec.replace("seeds = [0, 1, 2, 3, 4, 5, 6, 7]", "seeds = [0, 1]")
    for dropped in ("nope", "learned"):  # the verdicts need rope, its no-BOS twin, sink, swa, ntk
        spec = spec.replace(f'[variants.{dropped}]\npreset = "{dropped}"\n', "")
    tiny = TINY.replace("model.n_layer = 3", "model.n_layer = 2").replace(
        "n_head = 2", "n_head = 1"
    )
    text, _ = sweep_and_report(tmp_path, spec + tiny)
    assert "# The sink study" in text
    assert "from the records of 10 finished runs (of 10 planned) in 5 variants" in text
    for section in ("## Training", "## (c)", "## (b)", "## (a)", "## Sink emergence"):
        assert section in text, section
    assert "| rope-nobos |" in text and "Loss floors of the corpus" in text
    formed = text.split("`rope` formed a sink in ")[1].split(" ")[0]
    assert formed in "012"
    if formed == "0":  # 8 steps form no sink: the anchoring sentence must say so
        assert "cannot be read here" in text
    assert "C_res (RMS over queries 16–31" in text and "rotary pairs" in text
    assert (tmp_path / "report" / "sink_emergence.png").exists()


def test_sink_study_numbers_follow_their_definitions_on_hand_made_records():
    from posleak.analysis.sink_study import c_res_beyond, removed_beyond_layer0

    def row(layer, query, value, condition=None):
        return {"metric": "c_res", "layer": layer, "query": query, "head": None,
                "condition": condition, "value": value}  # fmt: skip

    rows = [row(0, i, 5.0) for i in range(6)] + [row(0, i, 0.0, "swap=mean") for i in range(6)]
    rows += [row(1, i, 2.0) for i in range(6)] + [row(1, i, 1.0, "swap=mean") for i in range(6)]
    rows += [row(2, i, 1.0) for i in range(6)] + [row(2, i, 1.0, "swap=mean") for i in range(6)]
    # layers >= 1, queries 1..3: base 3 * (4 + 1) = 15, swapped 3 * (1 + 1) = 6 -> 1 - 6/15
    assert math.isclose(removed_beyond_layer0(rows, "mean", 4), 1 - 6 / 15)
    assert removed_beyond_layer0(rows, "zeros", 4) is None
    # queries >= 4 at layers 1 and 2: RMS 2 and 1 -> mean 1.5 (layer 0 left out)
    assert math.isclose(c_res_beyond(rows, 4), 1.5)
