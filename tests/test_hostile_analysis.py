"""Hostile input to analyze, compare and sample: bad arguments, damaged records and run files,
concurrent analyses, killed parents. Each case through the real command line where there is
one: a one-line error naming the problem and the fix (no traceback), and nothing on disk
lost or silently wrong."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides
from hostile import ROOT, cli, copy_run, one_line_error

from posleak.train.config import build
from posleak.train.loop import train


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--tokens", "100000000"], "--tokens must be between 1 and 65536"),
        (["--tokens", "0"], "--tokens must be between"),
        (["--seed", str(2**70)], "--seed must be in [0, 2^63)"),
        (["--temperature", "nan"], "--temperature must be"),
        (["--num-samples", "0"], "--num-samples must be between 1 and 1000"),
        (["--seed", str(2**63 - 1), "--num-samples", "2"], "must stay below 2^63"),
    ],
)
def test_sampling_bounds_are_checked_before_any_token(trained, capsys, args, match):
    one_line_error(capsys, "sample", trained, *args, match=match)


def test_a_sample_streams_and_survives_bytes_and_terminals_that_are_not_utf8(tmp_path):
    """The output appears token by token (a long sample shows progress); a prompt of bytes
    that are not UTF-8 is taken as bytes; a terminal that cannot show a character gets an
    escape, not a codec error."""
    values = tiny_overrides(data__source="bible", data__vocab_size=259, train__steps=2)
    run = tmp_path / "run"
    train(build(values), run)
    env = {**os.environ, "POSLEAK_CACHE": str(tmp_path / "cache"), "PYTHONIOENCODING": "ascii"}
    prompt = b"caf\xc3\xa9 \xff\xfe"
    cmd = [sys.executable, "-m", "posleak", "sample", str(run), "--tokens", "3"]
    done = subprocess.run([*cmd, "--prompt", prompt], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"caf\\xe9 \\ufffd\\ufffd"), done.stdout
    assert b"Traceback" not in done.stderr


def test_pieces_of_a_stream_decode_as_the_whole(tmp_path):
    from posleak.train.sample import Codec

    class Cfg:
        class data:
            source, bos = "bible", "always"

    class Model:
        class cfg:
            vocab_size = 259

    codec = Codec(Model, Cfg)
    ids = [*"héllo wörld ✓".encode(), 256, 0xFF, 257, *"é".encode()]
    assert "".join(codec.pieces(iter(ids))) == codec.decode(ids)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--seqs", "1"], "--seqs must be"),
        (["--seq-len", "2"], "--seq-len must be"),
        (["--seq-len", "0"], "--seq-len must be"),
        (["--rope-scale", "0"], "--rope-scale must be"),
        (["--rope-scale", "1e308"], "--rope-scale must be"),
    ],
)
def test_bad_analysis_arguments_are_refused_not_replaced_by_defaults(trained, capsys, args, match):
    one_line_error(capsys, "analyze", trained, *args, "--out", trained / "x", match=match)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda text: text[:-50].encode(), "is not valid JSON"),
        (lambda text: b"\x00\xff\xfe binary" + text.encode(), "line 1 is not UTF-8"),
        (lambda text: text.encode() + b"[1, 2]\n", "is not a record"),
        (lambda text: text.encode() + b'{"value": 3}\n', "is not a record"),
    ],
    ids=["truncated", "binary", "list", "no-metric"],
)
def test_a_damaged_records_file_is_named_by_compare(trained, tmp_path, capsys, damage, match):
    analysed = tmp_path / "analysis"
    if not analysed.exists():
        assert cli(capsys, "analyze", trained, "--seqs", 8, "--out", analysed)[0] == 0
    records = analysed / "records.jsonl"
    records.write_bytes(damage(records.read_text()))
    err = one_line_error(capsys, "compare", analysed, "--out", tmp_path / "c", match=str(records))
    assert match in err and len(err.strip().splitlines()) == 1


def test_one_bad_metrics_line_keeps_every_other_record_and_is_named(finished, tmp_path, capsys):
    _, run = copy_run(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[0] = "{x"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="line 1 is not a metrics record"):
        assert cli(capsys, "train", "--resume", run, "--set", "train.steps=16")[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(2, 17))  # only the damaged line (step 1) is gone


def test_concurrent_analyses_of_one_folder_never_mix_rows(finished, tmp_path):
    _, run = copy_run(finished, tmp_path)
    other = tmp_path / "other"
    import shutil

    shutil.copytree(run, other)
    out = tmp_path / "shared-analysis"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "posleak", "analyze", str(r), "--seqs", "8", "--out", str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in (run, other)
    ]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err[-1000:]
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len({r["run"] for r in rows}) == 1  # one writer's rows, whole
    assert json.loads((out / "analysis.json").read_text())["run"].endswith(rows[0]["run"])
    assert not list(out.glob(".*tmp*"))


def test_compare_counts_a_run_once_refuses_mixed_options_and_empty_records(
    finished, tmp_path, capsys
):
    import shutil

    _, run = copy_run(finished, tmp_path)
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    assert cli(capsys, "analyze", run, "--seqs", 8)[0] == 0
    assert cli(capsys, "analyze", twin, "--seqs", 12)[0] == 0
    assert cli(capsys, "compare", run, run, tmp_path / "run", "--out", tmp_path / "c")[0] == 0
    assert "(n=1)" in (tmp_path / "c" / "report.md").read_text()
    one_line_error(capsys, "compare", run, twin, "--out", tmp_path / "c2", match="differ in seqs")
    (twin / "analysis" / "records.jsonl").write_text("")
    one_line_error(capsys, "compare", twin, "--out", tmp_path / "c3", match="holds no records")


def test_an_infinite_rope_scale_is_refused(trained, capsys):
    one_line_error(capsys, "analyze", trained, "--rope-scale", "inf", match="--rope-scale must")


def test_an_analysis_does_not_need_the_runs_summary_and_says_so_when_it_is_damaged(
    finished, tmp_path, capsys
):
    """summary.json gives the analysis only the run's final validation loss."""
    _, run = copy_run(finished, tmp_path)
    (run / "summary.json").write_text("{")
    code, err = cli(capsys, "analyze", run, "--seqs", 8, "--stages", "probe")
    assert code == 0 and f"warning: {run / 'summary.json'} is damaged" in err
    summary = json.loads((run / "analysis" / "analysis.json").read_text())
    assert summary["val_loss"] is None and summary["headline"]


def test_wrong_shapes_on_the_command_line_are_one_line(trained, tmp_path, capsys):
    (tmp_path / "preset.toml").write_text('preset = ["rope"]\n')
    one_line_error(
        capsys, "train", tmp_path / "preset.toml", "--out", tmp_path / "r", match="unknown preset"
    )
    one_line_error(capsys, "analyze", "hf:", match="hf: names no model")
    one_line_error(capsys, "analyze", trained, "--device", "meta", match="--device 'meta'")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(capsys, "analyze", trained, "--seqs", 8, "--out", a_file, match="is a file")
    one_line_error(capsys, "train", "/dev/null", match="is not a regular file")


def test_a_malformed_safetensors_header_is_named_and_analysis_falls_back(
    finished, tmp_path, capsys
):
    _, run = copy_run(finished, tmp_path)
    newest = run / "checkpoints" / "step_00000012"
    (newest / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    manifest = json.loads((newest / "manifest.json").read_text())
    from posleak.files import sha256_file

    manifest["model.safetensors"] = sha256_file(newest / "model.safetensors")
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="model.safetensors: unreadable safetensors"):
        assert cli(capsys, "analyze", run, "--seqs", 8)[0] == 0
    summary = json.loads((run / "analysis" / "analysis.json").read_text())
    assert summary["step"] == 8


def test_analyze_into_a_read_only_folder_fails_before_any_work(
    trained, tmp_path, capsys, monkeypatch
):
    import posleak.analysis.engine.folder as folder

    monkeypatch.setattr(folder.os, "access", lambda path, mode: False)
    monkeypatch.setattr(
        "posleak.analysis.engine.analyze.analysis_of", lambda *a: pytest.fail("work started")
    )
    one_line_error(capsys, "analyze", trained, "--out", tmp_path / "ro", match="read-only")


def test_a_second_compare_into_a_report_folder_in_use_is_refused(finished, tmp_path, capsys):
    """compare and study lock their report folder for the whole command: a second writer is
    told who holds it instead of racing it."""
    import json
    import os

    _, run = copy_run(finished, tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    (out / ".posleak-output").write_text("ours\n")
    holder = {"host": __import__("socket").gethostname(), "pid": os.getppid(), "since": 0}
    (out / ".lock").write_text(json.dumps(holder))  # a live process holds it
    one_line_error(capsys, "compare", run, "--out", out, "--seqs", "8", match="is in use by pid")
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".lock.guard", ".posleak-output"]


def test_analysis_workers_stop_when_their_parent_is_killed(tmp_path):
    """`compare --jobs 2` SIGKILLed mid-analysis (no cleanup runs): its worker processes stop
    too, instead of finishing analyses nobody waits for beside the next command's."""
    for seed in (0, 1):
        train(build(tiny_overrides(seed=seed)), tmp_path / f"rope-s{seed}")
    runs = [str(tmp_path / f"rope-s{seed}") for seed in (0, 1)]
    cmd = [sys.executable, "-m", "posleak", "compare", *runs, "--seqs", "512", "--jobs", "2"]
    parent = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def children() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent.pid and "spawn" in (stat.parent / "cmdline").read_text():
                found.append(int(stat.parent.name))
        return found

    deadline = time.monotonic() + 60
    while len(workers := children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(workers) >= 2, "the workers never started"
    time.sleep(1.0)  # into their analyses
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15

    def running(pid: int) -> bool:  # a zombie is gone, only not yet reaped
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if running(pid)]
    assert not alive, f"workers {alive} outlived their parent"
