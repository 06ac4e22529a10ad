"""Hostile sweeps: malformed sweep files, unsafe names, signals to a sweep and its children,
runs another process holds. Each case through the real command line where there is one: a
one-line error naming the problem and the fix (no traceback), and nothing on disk lost or
silently wrong."""

import json
import os
import signal
import time

import pytest
from hostile import cli, one_line_error, running, sweep, sweep_under_way

from posleak.cli import main
from posleak.train import checkpoint
from posleak.train.sweep import expand, read_sweep


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('seeds = [0]\n[variants."../../../escaped"]\nmodel.position = "rope"\n', "variant name"),
        ("seeds = 0\n[variants.rope]\n", "seeds must be"),
        ("seeds = [0]\n[variants.rope]\n[grid]\n'train.lr' = 0.001\n", "must be a non-empty list"),
        ("seeds = [0\n", "not valid TOML"),
    ],
)
def test_malformed_sweeps_are_one_line_and_write_nothing(tmp_path, capsys, body, match):
    path = sweep(tmp_path, body)
    one_line_error(capsys, "sweep", path, "--out", tmp_path / "s", match=match)
    assert not (tmp_path / "s").exists() and not (tmp_path.parent / "escaped").exists()


def test_grid_values_with_slashes_stay_inside_the_sweep_directory(tmp_path):
    docs = tmp_path / "a" / "b.txt"
    docs.parent.mkdir()
    docs.write_text("text " * 500)
    path = sweep(tmp_path, f'seeds = [0]\n[variants.rope]\n[grid]\n"data.source" = ["{docs}"]\n')
    (run,) = expand(read_sweep(path))
    assert "/" not in run.name and run.name.startswith("rope-source")


def test_sigterm_to_a_sweep_checkpoints_its_children_and_leaves_no_orphans(tmp_path):
    proc, run, child = sweep_under_way(tmp_path, steps=2000, ckpt_every=500, lines=20)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert not (run / ".lock").exists()
    assert checkpoint.list_checkpoints(run / "checkpoints")  # the child saved on its way out


def test_seed_in_a_grid_is_refused(tmp_path, capsys):
    path = sweep(tmp_path, "seeds = [0]\n[variants.rope]\n[grid]\nseed = [5, 6]\n")
    one_line_error(capsys, "sweep", path, "--out", tmp_path / "s", match="grid.seed")
    assert not (tmp_path / "s").exists()


def test_a_run_another_process_holds_is_left_to_it_not_failed(tmp_path, capsys):
    """Two sweeps on one folder: the runs the other one holds (its live lock) are reported as
    held by that process and left alone, not as failures of their own."""
    import socket

    path = sweep(tmp_path, "seeds = [0, 1]\n[variants.rope]\n")
    out = tmp_path / "s"
    assert cli(capsys, "sweep", path, "--print-commands", "--out", out)[0] == 0  # plans runs
    held = sorted(p for p in out.iterdir() if (out / "configs" / f"{p.name}.toml").exists())[0]
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    held.mkdir(exist_ok=True)
    (held / ".lock").write_text(json.dumps(lock))  # this test's process: alive
    code, err = cli(capsys, "sweep", path, "--out", out)
    assert code == 1 and f"{held.name}: held: in use by pid {os.getpid()}" in err, err
    assert "failed" not in err and not (held / "checkpoints").exists()
    others = [p for p in out.iterdir() if p.is_dir() and p.name not in ("configs", held.name)]
    assert len(others) == 1 and (others[0] / "summary.json").exists()
    assert json.loads((held / ".lock").read_text()) == lock  # not taken, not removed


def test_a_damaged_run_file_fails_its_run_not_the_sweep(tmp_path, capsys):
    path = sweep(tmp_path, "seeds = [0, 1]\n[variants.rope]\n")
    out = tmp_path / "s"
    assert cli(capsys, "sweep", path, "--out", out)[0] == 0
    first, second = sorted(p for p in out.iterdir() if (p / "sweep.json").exists())
    (first / "summary.json").write_text("{")
    (second / "summary.json").unlink()  # the second run has to finish again
    code, err = cli(capsys, "sweep", path, "--out", out)
    assert code == 1 and f"{first.name}: failed: {first / 'summary.json'} is damaged" in err
    assert json.loads((second / "summary.json").read_text())["steps"] == 2


def test_huge_seeds_in_a_sweep_and_huge_analyses_are_refused(trained, tmp_path, capsys):
    path = sweep(tmp_path, f"seeds = [{2**63}]\n[variants.rope]\n")
    one_line_error(capsys, "sweep", path, "--out", tmp_path / "s", match="seeds must be")
    one_line_error(
        capsys, "analyze", trained, "--seqs", 10**9, "--out", tmp_path / "a", match="GiB"
    )
    one_line_error(
        capsys, "analyze", trained, "--seq-len", 10**6, "--out", tmp_path / "a", match="GiB"
    )
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('seeds = [0]\n[variants.rope]\npreset = ["rope"]\n', "unknown preset"),
        ("seeds = [0]\ngrid = 3\n[variants.rope]\n", "grid must be a table"),
        ("seeds = [0]\nset = 3\n[variants.rope]\n", "set must be a table"),
    ],
)
def test_wrong_shapes_in_a_sweep_are_one_line(tmp_path, capsys, body, match):
    one_line_error(capsys, "sweep", sweep(tmp_path, body), "--out", tmp_path / "s", match=match)


def test_jobs_below_one_is_refused_before_anything_is_written(tmp_path, capsys):
    path = sweep(tmp_path, "seeds = [0]\n[variants.rope]\n")
    for jobs in ("0", "-1"):
        one_line_error(
            capsys, "sweep", path, "--out", tmp_path / "s", "--jobs", jobs, match="--jobs"
        )
    assert not (tmp_path / "s").exists()


def test_a_large_dry_run_prints_every_run(tmp_path, capsys):
    values = ", ".join(str(1e-4 * (i + 1)) for i in range(250))
    path = sweep(
        tmp_path,
        f"seeds = [0, 1]\n[variants.rope]\n[variants.nope]\n[grid]\n'train.lr' = [{values}]\n",
    )
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert (
        out.splitlines()[-1].startswith("1000 runs; to train: ") and out.count(" pending ") == 1000
    )


def test_a_sigkilled_sweeps_child_checkpoints_and_stops(tmp_path):
    proc, run, child = sweep_under_way(tmp_path, steps=5000, ckpt_every=1000, lines=5)
    proc.kill()
    proc.communicate()
    while running(child):  # it stops after its current step: bounded work, no deadline
        time.sleep(0.05)
    assert not (run / ".lock").exists()
    assert checkpoint.list_checkpoints(run / "checkpoints")
