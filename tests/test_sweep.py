"""Sweeps: expansion, matched conditions across variants, execution, failure isolation, resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import deterministic_metrics, tiny_overrides, write_config

from posleak.model import ConfigError
from posleak.train.config import build, presets, read_toml
from posleak.train.loop import Run
from posleak.train.sweep import Executor, expand, read_sweep

ROOT = Path(__file__).resolve().parent.parent


def sweep_file(tmp_path, body: str, **config_changes) -> Path:
    write_config(tmp_path / "base.toml", tiny_overrides(**config_changes))
    path = tmp_path / "sweep.toml"
    path.write_text('base = "base.toml"\n' + body)
    return path


def posleak(*args, **kwargs):
    cmd = [sys.executable, "-m", "posleak", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


VARIANTS = """
seeds = [0, 1]
[variants.rope]
model.position = "rope"
[variants.nope]
model.position = "nope"
"""


def test_expansion_is_deterministic_readable_and_crosses_the_grid(tmp_path):
    path = sweep_file(tmp_path, VARIANTS + '[grid]\n"train.lr" = [1e-3, 3e-3]\n')
    runs = expand(read_sweep(path))
    assert [r.name for r in runs] == [r.name for r in expand(read_sweep(path))]
    assert len(runs) == 2 * 2 * 2 and len({r.name for r in runs}) == 8
    assert runs[0].name.startswith("rope-lr0.001-s0-")
    assert {r.values["model.position"] for r in runs} == {"rope", "nope"}


def test_a_variant_may_name_its_own_seeds(tmp_path):
    body = VARIANTS + '[variants.markov]\nseeds = [2]\n"data.source" = "markov"\n'
    runs = expand(read_sweep(sweep_file(tmp_path, body)))
    assert [(r.variant, r.seed) for r in runs] == [
        ("rope", 0),
        ("rope", 1),
        ("nope", 0),
        ("nope", 1),
        ("markov", 2),
    ]
    assert all("seeds" not in r.values for r in runs)
    assert runs[-1].values["data.source"] == "markov"
    bad = sweep_file(tmp_path, VARIANTS + "[variants.odd]\nseeds = [0.5]\n")
    with pytest.raises(ConfigError, match="variants.odd"):
        read_sweep(bad)


def test_variants_see_identical_batches_and_shared_parameters_start_equal(tmp_path):
    runs = [r for r in expand(read_sweep(ROOT / "configs/sweeps/variants.toml")) if r.seed == 1]
    built = [Run(build(r.values), tmp_path / r.name) for r in runs]
    reference = built[0]
    shared_names = set(reference.model.state_dict())
    for other in built[1:]:
        for step in (0, 1, 57):
            assert torch.equal(reference.train_stream.batch(step), other.train_stream.batch(step))
        assert torch.equal(reference.val_stream.batch(0), other.val_stream.batch(0))
        state = other.model.state_dict()
        for name in shared_names & set(state):
            assert torch.equal(reference.model.state_dict()[name], state[name]), name
    learned = next(b for b, r in zip(built, runs, strict=True) if r.variant == "learned")
    assert "pos_embed.weight" in learned.model.state_dict()


def test_runs_go_seed_by_seed_so_an_early_stop_leaves_matched_variants(tmp_path):
    body = VARIANTS + '[variants.markov]\nseeds = [0]\n"data.source" = "markov"\n'
    runs = expand(read_sweep(sweep_file(tmp_path, body)))
    started = []
    (tmp_path / "sweep").mkdir()
    executor = Executor(tmp_path / "sweep", runs, jobs=1)
    executor.run_one = lambda run: started.append((run.variant, run.seed))
    executor.execute()
    assert started == [("rope", 0), ("nope", 0), ("markov", 0), ("rope", 1), ("nope", 1)]


def test_tiny_sweep_runs_isolates_a_broken_variant_and_skips_completed_runs(tmp_path):
    body = VARIANTS + (
        "[variants.broken]\n"
        'model.position = "rope"\ntrain.lr = 1e4\ntrain.grad_clip = 0.0\ntrain.warmup = 0\n'
        "[variants.invalid]\n"
        "model.n_head = 3\n"
    )
    path = sweep_file(tmp_path, body, train__steps=6)
    out = tmp_path / "sweep"
    result = posleak("sweep", path, "--out", out, "--jobs", "2")
    assert result.returncode == 1, result.stderr
    rows = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    status = {r["variant"]: set() for r in rows}
    for r in rows:
        status[r["variant"]].add(r["status"])
    assert status == {
        "rope": {"done"},
        "nope": {"done"},
        "broken": {"failed"},
        "invalid": {"invalid"},
    }
    broken = next(r for r in rows if r["variant"] == "broken")
    assert any(why in broken["error"] for why in ("loss is", "NaN", "non-finite weights"))
    invalid = next(r for r in rows if r["variant"] == "invalid")
    assert "not divisible by n_head=3" in invalid["error"]
    done = [r for r in rows if r["status"] == "done"]
    assert all(float(r["final_val_loss"]) > 0 and r["steps"] == "6" for r in done)
    assert "| rope-s0-" in (out / "summary.md").read_text()

    stamps = {r["run"]: (out / r["run"] / "summary.json").stat().st_mtime_ns for r in done}
    again = posleak("sweep", path, "--out", out)
    assert again.returncode == 1
    assert stamps == {r: (out / r / "summary.json").stat().st_mtime_ns for r in stamps}


def test_print_commands_gives_one_independent_command_per_valid_run(tmp_path):
    path = sweep_file(tmp_path, VARIANTS + "[variants.invalid]\nmodel.n_head = 3\n", train__steps=3)
    out = tmp_path / "sweep"
    result = posleak("sweep", path, "--out", out, "--print-commands")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("posleak train ") for line in lines)
    args = lines[0].split()[2:]
    assert Path(args[0]).exists() and args[-1] == "--resume"
    subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        capture_output=True,
    )
    assert (Path(args[2]) / "summary.json").exists()


def test_ctrl_c_stops_cleanly_and_a_rerun_continues_exactly(tmp_path):
    body = 'seeds = [0]\n[variants.rope]\nmodel.position = "rope"\n'
    # long enough that the signal always lands mid-run; no deadline, so a slow machine waits
    path = sweep_file(
        tmp_path, body, train__steps=1000, train__eval_every=100, train__ckpt_every=100
    )
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "posleak", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_name = expand(read_sweep(path))[0].name
    metrics = out / run_name / "metrics.jsonl"
    while proc.poll() is None and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 20
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert not (out / run_name / "summary.json").exists()
    assert posleak("sweep", path, "--out", out).returncode == 0
    reference = tmp_path / "reference"
    Run(build(json.loads(json.dumps(expand(read_sweep(path))[0].values))), reference).fit()
    assert deterministic_metrics(metrics) == deterministic_metrics(reference / "metrics.jsonl")


def test_presets_are_the_one_definition_of_each_variant(tmp_path):
    preset_keys = presets()
    for name, keys in preset_keys.items():
        config = ROOT / "configs" / f"{name}.toml"
        assert read_toml(config) == {**read_toml(ROOT / "configs/base.toml"), **keys}, name
    runs = expand(read_sweep(ROOT / "configs/sweeps/variants.toml"))
    for run in runs:
        assert {k: run.values[k] for k in preset_keys[run.variant]} == preset_keys[run.variant]
    body = 'seeds = [0]\n[variants.wide]\npreset = "swa"\n"model.window" = 64\n'
    (run,) = expand(read_sweep(sweep_file(tmp_path, body)))
    assert run.values["model.window"] == 64 and run.values["model.position"] == "rope"
    with pytest.raises(ConfigError, match="unknown preset 'swb'; valid presets"):
        read_sweep(sweep_file(tmp_path, 'seeds = [0]\n[variants.x]\npreset = "swb"\n'))


def test_set_applies_to_every_run_last_and_keeps_a_smoke_sweep_in_its_own_folder(tmp_path):
    """`posleak sweep FILE --set train.steps=3`: every run trains 3 steps (over the sweep's own
    [set] and its variants), into a folder of its own by default."""
    path = sweep_file(tmp_path, VARIANTS + '[set]\n"train.steps" = 9\n')
    smoke = posleak("sweep", path, "--set", "train.steps=3", "--out", tmp_path / "smoke")
    assert smoke.returncode == 0, smoke.stderr
    steps = {
        json.loads((run / "summary.json").read_text())["steps"]
        for run in (tmp_path / "smoke").glob("*-s*")
        if (run / "summary.json").exists()
    }
    assert steps == {3}
    dry = posleak("sweep", path, "--set", "train.steps=3", "--dry-run")
    assert dry.returncode == 0 and "runs/sweeps/sweep-set-" in dry.stdout, dry.stdout
    tokens = 3 * 4 * 32  # steps x batch x length of the tiny config, per run
    runs = [line for line in dry.stdout.splitlines() if " pending " in line]
    assert len(runs) == 4 and all(f" {tokens} tokens, ~0:00:" in line for line in runs), runs
    assert f"4 runs; to train: {4 * tokens:,} tokens, ~0:00:" in dry.stdout
    finished = posleak(
        "sweep", path, "--set", "train.steps=3", "--dry-run", "--out", tmp_path / "smoke"
    )
    assert "to train: 0 tokens" in finished.stdout  # what is done costs nothing


def test_the_study_table_names_variants_and_reaches_the_sweep_folder(tmp_path):
    from posleak.analysis.reports.study import roles_of

    body = VARIANTS + '[study]\nreport = "text"\nreference = "rope"\ncontrol = "nope"\n'
    out = tmp_path / "sweep"
    made = posleak("sweep", sweep_file(tmp_path, body), "--out", out, "--print-commands")
    assert made.returncode == 0, made.stderr
    roles = roles_of(out)
    assert (roles.report, roles["reference"], roles.get("window")) == ("text", "rope", None)
    with pytest.raises(KeyError, match=r"roles: \['control', 'reference'\]"):
        roles["refernce"]
    # a role naming no variant fails when the sweep file is read, in one line
    for role, value in (("reference", '"rpoe"'), ("pairs", '[["rope", "nop"]]')):
        bad = sweep_file(tmp_path, VARIANTS + f"[study]\n{role} = {value}\n")
        result = posleak("sweep", bad, "--out", tmp_path / "bad", "--dry-run")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        said = f"study.{role} must name variants of this sweep, got "
        assert said in result.stderr and "variants: ['nope', 'rope']" in result.stderr
    # the data every analysis reads is a source, not a variant; it must be a string
    bad = sweep_file(tmp_path, VARIANTS + "[study]\ndata = 3\n")
    result = posleak("sweep", bad, "--out", tmp_path / "bad", "--dry-run")
    assert result.returncode == 2 and "study.data must be a data source (e.g. bible), got 3" in (
        result.stderr
    )
    good = sweep_file(tmp_path, VARIANTS + '[study]\nreport = "text"\nreference = "rope"\n'
                      'data = "markov"\n')  # fmt: skip
    assert posleak("sweep", good, "--out", tmp_path / "good", "--print-commands").returncode == 0
    assert roles_of(tmp_path / "good").get("data") == "markov"
    # what the study reads: an unknown report, a report missing its required role
    (out / "study.json").write_text(json.dumps({"report": "txet"}))
    with pytest.raises(ValueError, match=r"'txet' is not a report; give one of \['text'"):
        roles_of(out)
    (out / "study.json").write_text(json.dumps({"report": "text", "control": "nope"}))
    with pytest.raises(ValueError, match='needs the role reference .* reference = "rope"'):
        roles_of(out)
    # a folder planned before sweeps kept their table reads as it did: text, usual roles
    (out / "study.json").unlink()
    assert roles_of(out).report == "text" and roles_of(out)["control"] == "sink"
    assert roles_of(out, "sinks")["nobos"] == "rope-nobos"  # a report asked for by name


def test_a_run_keeps_its_folder_when_its_config_is_spelled_anew(tmp_path):
    """Run names hash the keys as written. A sweep that writes a preset out as its keys (and
    spells "no window" 0 explicitly) plans the same runs under new names; the sweep finds the
    folders that already hold them by their resolved configs and trains nothing twice. A
    change of value is a new run."""
    preset = sweep_file(tmp_path, 'seeds = [0]\n[variants.swa]\npreset = "swa"\n', train__steps=3)
    out = tmp_path / "sweep"
    assert posleak("sweep", preset, "--out", out).returncode == 0
    (trained,) = [p.parent for p in out.glob("*/summary.json")]
    stamp = (trained / "summary.json").stat().st_mtime_ns
    written = 'seeds = [0]\n[variants.swa]\nmodel.position = "rope"\nmodel.window = {w}\n'
    window = presets()["swa"]["model.window"]
    same = sweep_file(tmp_path, written.format(w=window), train__steps=3, model__d_ff=0)
    (run,) = expand(read_sweep(same))
    assert run.name != trained.name  # another spelling, another hash
    (adopted,) = expand(read_sweep(same), out)
    assert adopted.name == trained.name
    assert posleak("sweep", same, "--out", out).returncode == 0
    assert (trained / "summary.json").stat().st_mtime_ns == stamp  # nothing retrained
    assert sorted(p.parent.name for p in out.glob("*/config.toml")) == [trained.name]
    other = sweep_file(tmp_path, written.format(w=window + 1), train__steps=3)
    (new,) = expand(read_sweep(other), out)
    assert new.name != trained.name
