"""Hostile state of run folders: corrupt checkpoints, planted links, locks, full disks,
signals, folders that are not ours. Each case through the real command line where there is
one: a one-line error naming the problem and the fix (no traceback), and nothing on disk
lost or silently wrong."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_config
from hostile import (
    ROOT,
    cli,
    copy_run,
    one_line_error,
    tiny_config,
    tree,
    truncate,
    weights,
)

from posleak.cli import main
from posleak.train import checkpoint


def test_a_corrupt_last_checkpoint_is_moved_aside_and_rewritten(tmp_path, capsys):
    config = tiny_config(tmp_path)
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert cli(capsys, "train", config, "--out", reference)[0] == 0
    assert cli(capsys, "train", config, "--out", run)[0] == 0
    truncate(checkpoint.step_dir(run / "checkpoints", 12) / "model.safetensors")
    with pytest.warns(UserWarning, match="unusable checkpoint moved"):
        assert cli(capsys, "train", config, "--out", run, "--resume")[0] == 0
    checkpoint.verify(checkpoint.step_dir(run / "checkpoints", 12))  # rewritten, and good
    assert len(list((run / "checkpoints" / "corrupt").iterdir())) == 1
    a, b = weights(run, 12), weights(reference, 12)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_where_corrupt_checkpoints_go_is_named_and_nothing_is_moved(tmp_path, capsys):
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    assert cli(capsys, "train", config, "--out", run)[0] == 0
    (run / "checkpoints" / "corrupt").write_text("mine")
    damaged = checkpoint.step_dir(run / "checkpoints", 12) / "model.safetensors"
    truncate(damaged)
    size = damaged.stat().st_size
    err = one_line_error(capsys, "train", config, "--out", run, "--resume", match="is a file")
    assert "move it away, then resume again" in err
    assert (
        run / "checkpoints" / "corrupt"
    ).read_text() == "mine" and damaged.stat().st_size == size


def test_every_kept_checkpoint_corrupt_restarts_and_ends_with_usable_ones(tmp_path, capsys):
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    assert cli(capsys, "train", config, "--out", run)[0] == 0
    for path in checkpoint.list_checkpoints(run / "checkpoints"):
        (path / "manifest.json").write_text("[]")  # a manifest of the wrong shape
    with pytest.warns(UserWarning):
        assert cli(capsys, "train", config, "--out", run, "--resume")[0] == 0
    kept = checkpoint.list_checkpoints(run / "checkpoints")
    assert [p.name for p in kept] == ["step_00000008", "step_00000012"]
    for path in kept:
        checkpoint.verify(path)
    assert len(list((run / "checkpoints" / "corrupt").iterdir())) == 2


def test_analyze_with_no_usable_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", tiny_config(tmp_path), "--out", run)[0] == 0
    for path in checkpoint.list_checkpoints(run / "checkpoints"):
        truncate(path / "model.safetensors")
    with pytest.warns(UserWarning):
        one_line_error(capsys, "analyze", run, "--seqs", 8, match="no usable checkpoint")


def test_resume_with_fewer_steps_than_done_is_refused_and_nothing_is_rewritten(tmp_path, capsys):
    run = tmp_path / "run"
    config = tiny_config(tmp_path)
    assert cli(capsys, "train", config, "--out", run)[0] == 0
    before = (run / "config.toml").read_text()
    one_line_error(
        capsys,
        "train",
        config,
        "--out",
        run,
        "--resume",
        "--set",
        "train.steps=4",
        match="past train.steps=4",
    )
    assert (run / "config.toml").read_text() == before


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "r" / "config.toml"))

    monkeypatch.setattr("posleak.train.rundir.atomic_write", full)
    err = one_line_error(
        capsys,
        "train",
        tiny_config(tmp_path),
        "--out",
        tmp_path / "r",
        match="No space left on device",
    )
    assert len(err.strip().splitlines()) == 1


def test_two_processes_never_both_take_over_a_stale_lock(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    for trial in range(3):
        run = tmp_path / f"t{trial}"
        run.mkdir()
        (run / ".lock").write_text(
            json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)})
        )
        # every process waits for `go`, tries once, reports, and a holder keeps the lock
        # until `done` appears: however slow the machine, the attempts overlap
        go, done = run / "go", run / "done"
        script = (
            "import sys, time, pathlib; from posleak.train.lock import RunLock, RunLocked\n"
            "go, done = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])\n"
            "lock = RunLock(sys.argv[1]); print('ready', flush=True)\n"
            "while not go.exists(): time.sleep(0.001)\n"
            "try:\n    lock.acquire(); print('held', flush=True)\n"
            "except RunLocked:\n    print('refused', flush=True)\n"
            "while not done.exists(): time.sleep(0.01)\n"
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(run), str(go), str(done)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 6
        go.touch()
        outcomes = [p.stdout.readline().strip() for p in procs]
        done.touch()
        for p in procs:
            p.communicate()
        assert outcomes.count("held") == 1, outcomes


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"host": "h"}'])
def test_unreadable_locks_are_named_and_respected(tmp_path, capsys, content):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text(content)
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", run, match=str(run / ".lock"))
    assert (run / ".lock").read_text() == content


def test_checkpoints_without_config_toml_are_a_run_and_are_never_retrained_over(
    finished, tmp_path, capsys
):
    config, run = copy_run(finished, tmp_path)
    (run / "config.toml").unlink()
    before = tree(run)
    for extra in ([], ["--resume"], ["--set", "model.n_layer=3", "--resume"]):
        one_line_error(
            capsys,
            "train",
            config,
            "--set",
            "seed=1",
            "--out",
            run,
            *extra,
            match="no config.toml",
        )
        assert tree(run) == before  # nothing moved to corrupt/, nothing rewritten


def test_a_checkpoint_that_does_not_fit_an_edited_config_is_kept_not_quarantined(
    finished, tmp_path, capsys
):
    _, run = copy_run(finished, tmp_path)
    edited = (run / "config.toml").read_text().replace("n_layer = 2", "n_layer = 3")
    (run / "config.toml").write_text(edited)
    err = one_line_error(capsys, "analyze", run, "--seqs", 8, match="does not describe")
    assert "restore the config.toml" in err and "resume" not in err
    one_line_error(capsys, "train", "--resume", run, match="does not fit")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000008", "step_00000012"]


@pytest.mark.parametrize("planted", ["config.toml", "metrics.jsonl", "notes.txt"])
def test_train_writes_only_into_an_empty_folder_or_a_run_of_its_own(tmp_path, capsys, planted):
    folder = tmp_path / "D"
    folder.mkdir()
    (folder / planted).write_text("mine\n")
    match = "no config.toml" if planted == "metrics.jsonl" else "not a posleak run"
    if planted == "config.toml":
        match = "config.toml"
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", folder, match=match)
    assert (folder / planted).read_text() == "mine\n"
    assert sorted(p.name for p in folder.iterdir()) == [planted]


def test_out_dot_in_a_project_folder_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "README.md").write_text("my project\n")
    config = tiny_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, "train", config, "--out", ".", match="not a posleak run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "run.toml"]


def test_pruning_and_loading_touch_only_checkpoint_names_we_wrote(finished, tmp_path, capsys):
    _config, run = copy_run(finished, tmp_path)
    backup = run / "checkpoints" / "step_00000020-backup"
    backup.mkdir()
    (backup / "mine.txt").write_text("keep")
    code, _ = cli(capsys, "train", "--resume", run, "--set", "train.steps=16")
    assert code == 0
    assert (backup / "mine.txt").read_text() == "keep"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000012", "step_00000016", "step_00000020-backup"]
    state = json.loads((run / "checkpoints" / "step_00000016" / "state.json").read_text())
    assert state["step"] == 16  # it resumed from 12, not from the "step 20" backup


def test_a_symlinked_checkpoints_folder_is_refused_and_the_target_untouched(
    finished, tmp_path, capsys
):
    import shutil

    _config, run = copy_run(finished, tmp_path)
    other = tmp_path / "other-run-checkpoints"
    shutil.move(run / "checkpoints", other)
    (run / "checkpoints").symlink_to(other)
    before = tree(other)
    one_line_error(
        capsys, "train", "--resume", run, "--set", "train.steps=40", match="symbolic link"
    )
    assert tree(other) == before


def test_a_checkpoint_asking_for_its_own_code_is_refused_and_its_code_never_runs(tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    one_line_error(capsys, "analyze", f"hf:{folder}", match="custom code (auto_map)")
    assert not marker.exists()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    err = one_line_error(capsys, "analyze", f"hf:{pickled}", match="pickled weights only")
    assert "weights_only" not in err


def test_atomic_writes_never_follow_a_planted_link(tmp_path, monkeypatch):
    from posleak.files import UnsafePath, atomic_write

    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "config.toml").symlink_to(victim)
    with pytest.raises(UnsafePath, match="symbolic link"):
        atomic_write(tmp_path / "config.toml", "x")
    monkeypatch.setattr("secrets.token_hex", lambda n: "predictable")
    (tmp_path / ".summary.json.tmp-predictable").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "summary.json", "x")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("planted", ["config.toml", "metrics.jsonl", "analysis"])
def test_planted_links_in_a_run_folder_redirect_no_write(finished, tmp_path, capsys, planted):
    config, run = copy_run(finished, tmp_path)
    victim = tmp_path / "victim"
    if planted == "analysis":
        victim.mkdir()
        one_line = ["analyze", run, "--seqs", 8]
    else:
        victim.write_text("precious")
        one_line = ["train", "--resume", run, "--set", "train.steps=16"]
        if planted == "config.toml":
            one_line = ["train", config, "--out", run, "--resume", "--set", "train.steps=16"]
    target = run / planted
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)
    target.symlink_to(victim)
    one_line_error(capsys, *one_line, match="symbolic link")
    if planted == "analysis":
        assert list(victim.iterdir()) == []
    else:
        assert victim.read_text() == "precious"


def test_export_into_the_runs_own_checkpoints_is_refused(finished, tmp_path, capsys):
    _, run = copy_run(finished, tmp_path)
    newest = run / "checkpoints" / "step_00000012"
    one_line_error(capsys, "export", run, "--out", newest, match="inside the run")
    checkpoint.verify(newest)


@pytest.mark.parametrize(
    ("file", "damage", "command", "match"),
    [
        ("config.toml", "truncate", "train", "config.toml is damaged"),
        ("config.toml", "truncate", "analyze", "config.toml is damaged"),
        ("config.toml", "no-model", "analyze", "config.toml is damaged"),
        ("env.json", "truncate", "train", "env.json is damaged"),
        ("env.json", "list", "train", "env.json holds a list"),
        ("sweep.json", "list", "analyze", "sweep.json holds a list"),
        ("sweep.json", "no-variant", "analyze", "sweep.json lacks its variant"),
    ],
)
def test_damaged_run_files_are_named_with_the_fix(
    finished, tmp_path, capsys, file, damage, command, match
):
    _, run = copy_run(finished, tmp_path)
    path = run / file
    if damage == "truncate":
        path.write_text((path.read_text() if path.exists() else "{}")[:-7])
    elif damage == "list":
        path.write_text("[1, 2]\n")
    elif damage == "no-model":
        path.write_text("seed = 0\n")
    else:
        path.write_text('{"seed": 0}\n')
    args = ["train", "--resume", run, "--set", "train.steps=16"]
    if command == "analyze":
        args = ["analyze", run, "--seqs", 8]
    err = one_line_error(capsys, *args, match=match)
    assert len(err.strip().splitlines()) == 1 and str(run) in err


def test_a_lock_guard_that_is_a_folder_is_refused_before_training(tmp_path, capsys):
    run = tmp_path / "r"
    (run / ".lock.guard").mkdir(parents=True)
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", run, match="lock guard")
    assert not (run / ".lock").exists() and not (run / "metrics.jsonl").exists()


def test_a_failing_clean_up_never_hides_the_real_error(tmp_path, capsys, monkeypatch):
    def busy(self):
        raise OSError(16, "Device or resource busy", str(self))

    monkeypatch.setattr(Path, "rmdir", busy)
    config = tiny_config(tmp_path, data__source=str(tmp_path / "missing.txt"))
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match="matches no file")


def test_a_reader_racing_the_pruning_gets_the_newer_checkpoint(finished, tmp_path, monkeypatch):
    import shutil

    from posleak.train.rundir import RunDir

    _, run = copy_run(finished, tmp_path)
    real = checkpoint.load_weights
    calls = []

    def pruned_meanwhile(path, model):
        calls.append(path.name)
        if len(calls) == 1:  # the run prunes step 12 after listing, and writes step 16
            shutil.copytree(path, path.with_name("step_00000016"))
            shutil.rmtree(path)
            raise FileNotFoundError(2, "No such file or directory", str(path / "model.safetensors"))
        return real(path, model)

    monkeypatch.setattr(checkpoint, "load_weights", pruned_meanwhile)
    _, _, state = RunDir(run).load_model()
    assert calls == ["step_00000012", "step_00000016"]
    assert Path(state["checkpoint"]).name == "step_00000016"


def test_sigterm_during_set_up_exits_130_and_leaves_no_lock(tmp_path):
    run = tmp_path / "r"
    config = tiny_config(tmp_path)
    script = (
        "import sys, time\n"
        "from posleak.train import loop\n"
        "loop.Run.__init__ = lambda *a, **k: time.sleep(60)\n"
        "from posleak.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "train", str(config), "--out", str(run)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (run / ".lock").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert not (run / ".lock").exists()


def test_a_failed_train_keeps_the_users_own_empty_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    config = tiny_config(tmp_path, data__source=str(tmp_path / "missing.txt"))
    one_line_error(capsys, "train", config, "--out", mine, match="matches no file")
    assert mine.is_dir() and list(mine.iterdir()) == []


@pytest.mark.parametrize("command", [["bench", "--quick"], ["pretrained-study", "hf:x"]])
def test_an_output_that_is_a_fifo_or_device_is_refused_before_any_work(tmp_path, command, capsys):
    """bench and pretrained-study end in an atomic rename over --out: over /dev/null as root
    that replaced the machine's device with a regular file. A FIFO stands in for the device."""
    import stat

    from posleak.files import UnsafePath, atomic_write

    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    assert main([*command, "--out", str(fifo)]) == 2
    error = capsys.readouterr().err
    assert "not a regular file" in error and str(fifo) in error and "Traceback" not in error
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    with pytest.raises(UnsafePath, match="not a regular file"):
        atomic_write(fifo, "x")
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and not list(tmp_path.glob(".out.tmp-*"))


def test_ctrl_c_prints_the_command_that_resumes_and_that_command_does(tmp_path):
    """The hint once said `--resume --out RUN`, a form the command line refuses; it is now the
    command itself, and running it resumes from the saved step and says so."""
    config = write_config(tmp_path / "c.toml", tiny_overrides(train__steps=3000))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "posleak", "train", str(config), "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().split()) > 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    hint = f"posleak train --resume {run}"
    assert proc.returncode == 130 and hint in err, err
    step = checkpoint.step_of(checkpoint.list_checkpoints(run / "checkpoints")[-1])
    again = [sys.executable, "-m", *hint.split()[:3], str(run), "--set", f"train.steps={step + 4}"]
    done = subprocess.run(again, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} from step {step}" in done.stderr


@pytest.mark.parametrize("command", ["analyze", "compare", "study", "sweep"])
def test_an_output_folder_of_someone_elses_files_is_refused_and_left_as_it_was(
    finished, tmp_path, capsys, command
):
    """analyze, compare, study and sweep once replaced report.md and records.jsonl in a
    user's folder (only train and export checked): posleak writes only into a new or empty
    folder, or one it marked as its own."""
    _, run = finished
    folder = tmp_path / "D"
    folder.mkdir()
    for name in ("report.md", "records.jsonl"):
        (folder / name).write_text("mine\n")
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text(f'base = "{finished[0]}"\nseeds = [0]\n[variants.rope]\n')
    argv = {
        "analyze": ["analyze", str(run), "--seqs", "8"],
        "compare": ["compare", str(run), "--seqs", "8"],
        "study": ["study", str(run.parent), "--seqs", "8"],
        "sweep": ["sweep", str(sweep_file)],
    }[command]
    assert main([*argv, "--out", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "holds files posleak did not write" in error and "Traceback" not in error, error
    assert sorted(p.name for p in folder.iterdir()) == ["records.jsonl", "report.md"]
    assert all(p.read_text() == "mine\n" for p in folder.iterdir())
