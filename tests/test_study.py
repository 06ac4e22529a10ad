"""The study pipeline end to end: study-small.toml at a tiny budget, swept, analysed and
reported; and the report's verdicts against hand-made paired numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from posleak.analysis.reports.sink_study import emergence_seed, persistence
from posleak.analysis.reports.study import level
from posleak.analysis.reports.text_study import layer_slope
from posleak.analysis.reports.verdicts import Verdicts
from posleak.analysis.stages import NUMBERS

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
    """Sweep `spec` at --jobs 2, write `posleak study`'s report on 8 sequences (its analyses
    two at a time too): its text and the sweep folder."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(spec)
    out = tmp_path / "sweep"
    done = posleak("sweep", sweep, "--out", out, "--jobs", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    report = posleak("study", out, "--out", tmp_path / "report", "--seqs", "8", "--jobs", "2")
    assert report.returncode == 0, report.stderr[-2000:]
    return (tmp_path / "report" / "report.md").read_text(), out


def verdict_rows(text: str) -> list[tuple[str, str]]:
    """(contrast, verdict cell) of every Holm table (the rows under a 'difference from' header)."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("| contrast | difference from"):
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("|---"):
            label, cell = line.strip("| ").split(" | ")
            rows.append((label, cell))
        elif not line.startswith("|"):
            inside = False
    return rows


def test_study_small_runs_end_to_end_at_a_tiny_budget(tmp_path):
    spec = (ROOT / "configs/sweeps/study-small.toml").read_text()
    spec = spec.replace('base = "../', f'base = "{ROOT / "configs"}/')
    spec = spec.replace("train.steps = 200", "train.steps = 8")  # Markov's own budget
    text, out = sweep_and_report(tmp_path, spec + TINY)
    assert "from the records of 19 finished runs (of 19 planned) in 9 variants" in text
    assert "definitions version 4" in text
    sections = ("## (a)", "## (b)", "## (c)", "## At initialisation", "4× its training length")
    for claim in (*sections, "## Over training", "Length extrapolation", "## Training", "## Scale"):
        assert claim in text, claim
    assert "| markov-nope |" in text and "| sink |" in text
    rows = verdict_rows(text)
    assert len(rows) == 6 + 5 + 12 + 2  # (a), (b), (c) and NTK at inference: every contrast
    for label, cell in rows:  # each says what its test found: 3 seeds, or why there is none
        if "`learned`" in label:  # the positive control has one seed
            assert cell.endswith("(n=1 < 3: no test)"), cell
            continue
        if "BOS →" in label and "no test" in cell:
            # a seed drops out of a share when its model broke or its intact signal is not
            # positive (nothing to remove): at 8 training steps that happens
            continue
        assert any(v in cell for v in ("**finding**", "not detected (MDE", "after Holm")), cell
        if "not tested: the primary contrast" in cell:  # gatekeeping: the primary is a null
            continue
        assert "sign-flip p" in cell and "Holm" in cell, cell
    assert "queries 16–31 only" in text  # the window contrast reads where w = 16 binds
    rope = [json.loads(p.read_text())["headline"] for p in out.glob("rope-s*/analysis/*.json")]
    signed = NUMBERS["c_res_window_signed_mean"].key()
    floor = level(dict(enumerate(h["c_res_window_floor"] ** 2 for h in rope)))  # as a C²
    assert f"| rope | {level(dict(enumerate(h[signed] for h in rope)))} | {floor} |" in text
    assert "| intact C², content keys j ≥ 1 |" in text and "its no-signal floor in `rope`" in text
    assert not (tmp_path / "report" / "comparison").exists()  # the comparison is compare's
    assert (tmp_path / "report" / "emergence.png").exists()
    box = text.split("## Verdicts at a glance")[1].split("\n## ")[0]
    for question in ("(a) Does the residual", "(b) What share", "(c) Do sink heads form"):
        assert f"- **{question}" in box, box  # each claim's answer before any table
    for name in ("verdict_a.png", "verdict_c.png"):  # (b) tests nothing at one seed
        assert f"]({name})" in text and (tmp_path / "report" / name).stat().st_size > 0
    steps = sorted(p.name for p in (out).glob("rope-s0-*/analysis-step*"))
    assert steps == ["analysis-step0", "analysis-step4"]  # every kept checkpoint but the last
    for variant in ("ntk", "swa", "nope", "sink"):  # step 0 of every seed of every text variant
        assert len(list(out.glob(f"{variant}-s*/analysis-step0/analysis.json"))) == 3, variant
    # step 0 runs what the claims pair with it; the reference's first seed, read at every
    # checkpoint over training, runs every stage there
    ran = {
        p.parent.parent.name.split("-")[0] + p.parent.parent.name.split("-")[1]: json.loads(
            p.read_text()
        )["stages"]
        for p in out.glob("*-s[01]-*/analysis-step0/analysis.json")
    }
    every = json.loads(next(out.glob("rope-s0-*/analysis/analysis.json")).read_text())["stages"]
    assert ran["ropes0"] == every and "BOS replacements" in every
    assert "BOS replacements" not in ran["ropes1"] and "length extrapolation" not in ran["nopes0"]
    assert {"probes", "key-0 knockout", "routes and head knockouts"} <= set(ran["ntks1"])
    labels = {"key-0 knockout", "key-1 knockout (control)", "write route", "mass route",
              "value ablation"}  # fmt: skip
    routes = [r for r in text.splitlines() if r.startswith("| `") and r.split(" | ")[1] in labels]
    assert len(routes) == 5 * 6  # every intervention beside step 0, in every text variant
    assert all("| `markov" not in r for r in routes)

    # (c) rests on what training added: each cell is the trained run minus its step 0
    def beyond_key1(folder: str) -> dict:
        found = {}
        for run in out.glob("rope-s*"):
            h = json.loads((run / folder / "analysis.json").read_text())["headline"]
            found[run.name] = h[KEY1] - h[KEY0]
        return found

    KEY1, KEY0 = "knockout_probe_refit_r2_log_key1_last", "knockout_probe_refit_r2_log_last"
    trained, initial = beyond_key1("analysis"), beyond_key1("analysis-step0")
    learned = sum(trained[r] - initial[r] for r in trained) / len(trained)
    label = "`rope`: position R² removed by key 0 beyond key 1 (refit), trained − step 0"
    assert dict(rows)[label].startswith(f"{learned:.3g} ["), dict(rows)[label]
    windowed = json.loads(next(out.glob("rope-s1-*/analysis/analysis.json")).read_text())
    assert windowed["options"]["contrast_window"] == 16  # the full model read with swa's w


def test_verdicts_are_one_holm_family_and_say_what_each_test_found():
    ref = {0: 1.0, 1: 2.0, 2: 3.0}
    verdicts = Verdicts(
        [
            ("up", {0: 1.5, 1: 2.4, 2: 3.6}, ref),
            ("down", {0: 0.5, 1: 1.6, 2: 2.4}, ref),
            ("flat", {0: 1.5, 1: 1.5, 2: 3.1}, ref),
            ("few", {0: 9.0, 1: 9.0}, ref),
        ]
    )
    assert verdicts.words("up").startswith("**higher**")
    assert verdicts.words("down").startswith("**lower**")
    flat = verdicts.words("flat")
    assert flat.startswith("not detected at this scale") and "smallest detectable" in flat
    assert "not tested" in verdicts.words("few")
    assert verdicts.nulls == 1  # "few" is not tested, so not in the family
    # Holm: the same p-value is a finding alone and not within a family of equal tests
    marginal = {0: 1.5, 1: 2.4, 2: 3.6}  # p = 0.013: below 0.05, above 0.05 / 4
    alone = Verdicts([("m", marginal, ref)])
    family = Verdicts([(str(k), marginal, ref) for k in range(4)])
    assert alone.words("m").startswith("**")
    assert family.words("0").startswith("not a finding after Holm correction (p 0.013, Holm 0.05")
    assert "interval excludes 0" in family.words("0")
    cell = family.table("0")[2]  # the first contrast's row
    assert "not a finding after Holm, though its interval excludes 0" in cell


def test_a_constant_difference_is_shown_but_never_joins_the_family():
    ref = {0: 1.0, 1: 2.0, 2: 3.0}
    marginal = {0: 1.5, 1: 2.4, 2: 3.6}  # p = 0.013: a finding alone, not beside a second test
    constant = {seed: value + 0.25 for seed, value in ref.items()}  # 0.25 in every seed
    family = Verdicts([("m", marginal, ref), ("c", constant, ref)])
    assert set(family.adjusted) == {0} and family.words("m").startswith("**higher**")
    assert family.words("c") == "0.25 in every seed: a constant, not tested"
    assert family.table("0")[3] == "| c | 0.25 in every seed (n=3; constant: no test) |"
    assert family.nulls == 0


def test_the_depth_slope_reads_layers_from_one_on():
    def row(layer, value, condition=None):
        condition = condition or {"w": 8}
        return {"metric": "c_res_window_signed", "layer": layer, "head": None,
                "condition": condition, "value": value}  # fmt: skip

    rows = [row(0, 99.0), row(1, 1.0), row(2, 3.0), row(3, 5.0), row(2, 50.0, {"w": 4})]
    w8 = {"w": 8}
    assert layer_slope(rows, "c_res_window_signed", w8) == 2.0  # layer 0 left out
    assert math.isclose(layer_slope([row(1, 1.0), row(2, 1.0)], "c_res_window_signed", w8), 0)
    assert layer_slope([row(0, 1.0), row(1, 2.0)], "c_res_window_signed", w8) is None
    assert level({0: 0.10, 1: 0.11, 2: 0.12}, percent=True) == "11% [9%, 13%] (n=3)"
    assert level({0: 0.5}) == "0.5 (n=1)" and level({}) == "–"


def test_the_sink_study_runs_end_to_end_at_a_tiny_budget(tmp_path):
    spec = (ROOT / "configs/sweeps/sinks.toml").read_text()
    spec = spec.replace('base = "../', f'base = "{ROOT / "configs"}/')
    spec = spec.replace("seeds = [0, 1, 2, 3, 4, 5, 6, 7]", "seeds = [0, 1]")
    for dropped in ("nope", "learned"):  # the verdicts need rope, its no-BOS twin, sink, swa, ntk
        spec = spec.replace(f'[variants.{dropped}]\npreset = "{dropped}"\n', "")
    spec = spec.split("[variants.gated]")[0]  # softpick answers for attention that need not sink
    spec = spec.replace('need_not_sink = ["softpick", "gated"]', 'need_not_sink = ["softpick"]')
    tiny = TINY.replace("model.n_layer = 3", "model.n_layer = 2").replace(
        "n_head = 2", "n_head = 1"
    )
    text, out = sweep_and_report(tmp_path, spec + tiny)
    assert "# The sink study" in text
    toc = text.split("## Contents\n\n")[1].split("\n\n")[0].splitlines()
    headings = [line[3:] for line in text.split("## Contents")[1].splitlines()
                if line.startswith("## ")]  # fmt: skip
    assert [line.split("](")[0][3:] for line in toc] == headings  # every section, in order
    assert (
        "- [(c) Do sinks form, where, and do they matter?](#c-do-sinks-form-where-and-do-they-"
        "matter)" in toc
    )
    assert "from the records of 12 finished runs (of 12 planned) in 6 variants" in text
    for section in ("## Training", "## (c)", "## (b)", "## (a)", "## Sink emergence"):
        assert section in text, section
    assert "| rope-nobos |" in text and "Loss floors of the corpus" in text
    formed = text.split("`rope` formed a sink in ")[1].split(" ")[0]
    assert formed in "012"
    if formed == "0":  # 8 steps form no sink: the anchoring sentence must say so
        assert "cannot be read here" in text
    assert "The residual component at queries 16–31, where the window of 16 keys binds" in text
    assert "rotary pairs" in text
    assert (tmp_path / "report" / "sink_emergence.png").exists()
    # every intervention on key 0 in every variant, trained beside step 0 of the same seed
    routes = [
        r
        for r in text.splitlines()
        if r.startswith("| `") and ("route |" in r or "ablation |" in r)
    ]
    assert len(routes) == 3 * 6 and all(r.count("(n=2)") >= 3 for r in routes), routes
    step0 = {p.parent.parent.name for p in out.glob("*/analysis-step0/analysis.json")}
    assert len(step0) == 12
    # softpick answers a family of its own, and stays out of (b)'s and (c)'s
    own = text.split("## Does attention that need not sink")[1].split("\n## ")[0]
    assert "`softpick` − `rope`: λ₀, strongest head" in own and "| softpick |" in own
    assert "`softpick` − `sink`, BOS → mean" not in text
    # (b) shows the signal its shares divide: rope's intact content-key C_res beside its floor
    rope = [json.loads(p.read_text())["headline"] for p in out.glob("rope-s*/analysis/*.json")]
    intact = {i: h[NUMBERS["c_res_content"].key()] for i, h in enumerate(rope)}
    floor = {i: h[NUMBERS["c_res_content_floor"].key()] for i, h in enumerate(rope)}
    rows = [r for r in text.splitlines() if r.startswith(("| intact C², content", "| its no-"))]
    assert rows[0].startswith(f"| intact C², content keys j ≥ 1 | {level(intact)} | ")
    assert rows[1].startswith(f"| its no-signal floor | {level(floor)} | ")
    ratios = [intact[i] / floor[i] for i in intact if floor[i] > 0]
    ratio = sum(ratios) / len(ratios)
    assert f"divides is {ratio:.1f}× its no-signal floor in `rope`" in text
    # asked for other options, the study analyses again rather than reuse and mislabel
    again = posleak("study", out, "--out", tmp_path / "again", "--seqs", "12")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "12 held-out sequences per analysis" in (tmp_path / "again/report.md").read_text()
    made = [json.loads(p.read_text()) for p in out.glob("*/analysis*/analysis.json")]
    assert len(made) > 10 and {m["seqs"] for m in made} == {12}


def test_emergence_is_shown_for_the_first_seed_that_ends_with_a_sink():
    def run(seed, sink_heads):
        return {"seed": seed, "headline": {"knockout_sink_heads": sink_heads}}

    assert emergence_seed([run(0, 0), run(1, 2.0), run(2, 1.0)])["seed"] == 1
    assert emergence_seed([run(0, 0), run(1, None)])["seed"] == 0  # none: the first seed
    flickering = {0: {0: 0.0, 50: 0.0}, 3: {0: 0.0, 50: 1.0, 100: 0.0, 150: 1.0, 200: 1.0}}
    assert persistence(flickering) == (
        "From its first checkpoint with a sink: seed 0 has none at any checkpoint; "
        "seed 3 has one at 3 of the 4 checkpoints from step 50 on."
    )


def test_the_light_cone_study_runs_end_to_end_at_a_tiny_budget(tmp_path):
    """configs/sweeps/light_cone.toml with 3 seeds at a tiny budget (4 bands of 8 queries);
    `posleak study` recognises it by its document-aligned runs."""
    spec = (ROOT / "configs/sweeps/light_cone.toml").read_text()
    spec = spec.replace('base = "../', f'base = "{ROOT / "configs"}/')
    spec = spec.replace("seeds = [0, 1, 2, 3]", "seeds = [0, 1, 2]")
    text, out = sweep_and_report(tmp_path, spec + TINY)
    assert "from 30 finished runs (of 30 planned) in 10 variants" in text
    for section in ("## 1. Does a window's band frontier grow", "## 2. Is the window's",
                    "## 3. Does NTK suppress"):  # fmt: skip
        assert section in text, section
    rows = verdict_rows(text)
    assert [label for label, _ in rows] == [
        "`swa-doc` trained", "`nope-swa-doc` trained", "`swa-rand` trained",
        "`nope-swa-rand` trained", "`swa-doc` − `rope-doc`", "`nope-swa-doc` − `nope-doc`",
        "`swa-rand` − `rope-rand`", "`nope-swa-rand` − `nope-rand`", "`ntk-doc` − `rope-doc`",
        "`ntk-rand` − `rope-rand`", "`rope-doc` at 4T, s = 8 − s = 1",
        "`rope-rand` at 4T, s = 8 − s = 1",
    ]  # fmt: skip
    assert all("n=3" not in c or "no test" not in c or "constant" in c for _, c in rows)
    for png in ("light_cone_step0.png", "light_cone_trained.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    rope = next(out.glob("rope-rand-s0-*"))
    assert {p.name for p in rope.glob("light-cone*")} == {
        "light-cone", "light-cone-step0", *(f"light-cone-4x-s{s}" for s in (1, 2, 4, 8))
    }  # fmt: skip


def test_the_sinks_on_text_study_reads_text_sequences_only(tmp_path):
    """configs/sweeps/sinks-text.toml at a tiny budget: the mixture and its pure-text control,
    every analysis (step 0 too) made on KJV sequences, λ₀ decided trained − step 0 and
    mixture − text in one family."""
    spec = (ROOT / "configs/sweeps/sinks-text.toml").read_text()
    spec = spec.replace('base = "../', f'base = "{ROOT / "configs"}/')
    spec = spec.replace("seeds = [0, 1, 2, 3]", "seeds = [0, 1, 2]")
    tiny = TINY.replace("model.n_layer = 3", "model.n_layer = 2")
    text, out = sweep_and_report(
        tmp_path, spec + tiny.replace("train.steps = 8", "train.steps = 6")
    )
    assert "# Sinks on text inputs" in text and "**Every analysis reads 8 held-out KJV" in text
    made = [json.loads(p.read_text()) for p in out.glob("*/analysis*/analysis.json")]
    assert len(made) == 12 and {m["data"] for m in made} == {"bible"}  # 6 runs, trained + step 0
    assert {m["step"] for m in made} == {0, 6}
    configs = {p.name.split("-")[0]: p.read_text() for p in (out / "configs").glob("*.toml")}
    assert 'source = "mixture"' in configs["mixture"] and 'source = "bible"' in configs["text"]
    labels = [label for label, _ in verdict_rows(text)]
    assert labels[:3] == [
        "`mixture`: λ₀, strongest head, trained − step 0",
        "`text`: λ₀, strongest head, trained − step 0",
        "`mixture` − `text`: λ₀, strongest head, trained",
    ]
    for section in ("## Training", "## Does a sink learnt on copy sequences sit on text?",
                    "## (c) Do sinks form", "## (b) Replacing BOS on text inputs"):  # fmt: skip
        assert section in text, section
