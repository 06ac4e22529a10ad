"""Hostile input and faults, through the real command line: each case gets a one-line error
(no traceback), and nothing on disk is lost or silently wrong."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, write_config
from safetensors.torch import load_file

from posleak.cli import main
from posleak.data import DataConfig
from posleak.data.text import TextCorpus
from posleak.train import checkpoint
from posleak.train.config import build
from posleak.train.loop import train
from posleak.train.sweep import expand, read_sweep

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_line_error(capsys, *args, match: str) -> str:
    code, err = cli(capsys, *args)
    assert code == 2, err
    assert err.startswith("error") and match in err, err
    return err


def tiny_config(tmp_path, name="run.toml", **changes) -> Path:
    return write_config(tmp_path / name, tiny_overrides(**changes))


# ------------------------------------------------------------------ checkpoints
def weights(run: Path, step: int) -> dict:
    return load_file(str(checkpoint.step_dir(run / "checkpoints", step) / "model.safetensors"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


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


# ------------------------------------------------------------------ token cache and text
def text_corpus(tmp_path, content: bytes = b"hello world\n" * 200):
    source = tmp_path / "text.txt"
    source.write_bytes(content)
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), seq_len=16)
    return cfg, TextCorpus(str(source), [content], 0.05, cfg.cache_dir)


@pytest.mark.parametrize("damage", ["sevens", "truncate", "delete"])
def test_a_damaged_token_cache_is_detected_and_rebuilt(tmp_path, damage):
    text_corpus(tmp_path)
    folder = next((tmp_path / "cache" / "text").iterdir())
    good = np.load(folder / "train.npy").copy()
    target = folder / "train.npy"
    if damage == "sevens":
        arr = np.load(target)
        np.save(target, np.full_like(arr, 7))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:64])
    else:
        target.unlink()
    with pytest.warns(UserWarning, match="rebuilding the token cache"):
        _, again = text_corpus(tmp_path)
    assert np.array_equal(np.asarray(again.splits["train"][0]), good)


def test_invalid_utf8_trains_on_the_files_bytes_and_binary_files_are_refused(tmp_path, capsys):
    content = b"caf\xe9 \xff\xfe ok\n" * 100  # Latin-1 bytes: invalid UTF-8
    _, corpus = text_corpus(tmp_path, content)
    train_ids = np.asarray(corpus.splits["train"][0])
    assert bytes(train_ids[: len(content) // 2].astype(np.uint8)) == content[: len(content) // 2]
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    config = tiny_config(tmp_path, data__source=str(binary))
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match="looks binary")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"data__seq_len": 4000}, "do not fit the"),  # longer than the validation split
        ({"data__val_fraction": 0.9}, "leaves no train documents"),
    ],
)
def test_data_too_small_fails_before_the_run_directory_is_made(tmp_path, capsys, changes, match):
    text = tmp_path / "docs"
    text.mkdir()
    for i in range(40):
        (text / f"{i}.txt").write_text("a short document\n" * 5)
    changes = {"data__source": str(text), "data__cache_dir": str(tmp_path / "cache"), **changes}
    config = tiny_config(tmp_path, **changes)
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match=match)
    assert not (tmp_path / "r").exists()
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


# ------------------------------------------------------------------ values that validate badly
@pytest.mark.parametrize(
    "override",
    [
        "train.min_lr_ratio=-1",
        "train.weight_decay=-0.1",
        "train.beta1=1.0",
        "train.threads=-1",
        "train.lr=inf",
        "train.grad_clip=nan",
        "model.norm_eps=-1e-5",
        "train.batch_size=1000000000",
        "model.d_model=1000000",
        "data.seq_len=0",
        "data.val_fraction=0.0",
    ],
)
def test_values_out_of_range_are_refused_up_front(tmp_path, capsys, override):
    key = override.split("=")[0].split(".")[-1]
    one_line_error(
        capsys,
        "train",
        tiny_config(tmp_path),
        "--set",
        override,
        "--out",
        tmp_path / "r",
        match=key,
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("include = 5\n", "include must be"),
        (b"[model]\nn_layer = 2 # \xff\n", "not UTF-8"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_malformed_config_files_are_one_line(tmp_path, capsys, text, match):
    config = tmp_path / "bad.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match=match)


def test_a_directory_as_config_and_a_file_as_out_are_one_line(tmp_path, capsys):
    one_line_error(capsys, "train", tmp_path, match="is a directory")
    existing = tmp_path / "file"
    existing.write_text("keep me")
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", existing, match="is a file")
    assert existing.read_text() == "keep me"


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


# ------------------------------------------------------------------ analysis inputs
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train(build(tiny_overrides()), run)
    return run


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--seqs", "1"], "--seqs must be"),
        (["--seq-len", "2"], "--seq-len must be"),
        (["--seq-len", "0"], "--seq-len must be"),
        (["--rope-scale", "0"], "--rope-scale must be"),
    ],
)
def test_bad_analysis_arguments_are_refused_not_replaced_by_defaults(trained, capsys, args, match):
    one_line_error(capsys, "analyze", trained, *args, "--out", trained / "x", match=match)


def test_a_truncated_records_file_is_named_by_compare(trained, tmp_path, capsys):
    assert cli(capsys, "analyze", trained, "--seqs", 8)[0] == 0
    records = trained / "analysis" / "records.jsonl"
    records.write_text(records.read_text()[:-50])
    one_line_error(capsys, "compare", trained, "--out", tmp_path / "c", match=str(records))


# ------------------------------------------------------------------ sweeps
def sweep(tmp_path, body: str) -> Path:
    write_config(tmp_path / "base.toml", tiny_overrides(train__steps=2))
    path = tmp_path / "sweep.toml"
    path.write_text('base = "base.toml"\n' + body)
    return path


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
    path = sweep(tmp_path, 'seeds = [0]\n[variants.rope]\nmodel.position = "rope"\n')
    base = tmp_path / "base.toml"
    write_config(base, tiny_overrides(train__steps=2000, train__ckpt_every=500))
    out = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "posleak", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = out / expand(read_sweep(path))[0].name
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().split()) > 20
    ):
        time.sleep(0.02)
    child = json.loads((run / ".lock").read_text())["pid"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert not (run / ".lock").exists()
    assert checkpoint.list_checkpoints(run / "checkpoints")  # the child saved on its way out


# ------------------------------------------------------------------ locks
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
        script = (
            "import sys, time; from train.lock import RunLock, RunLocked\n"
            "lock = RunLock(sys.argv[1]); time.sleep(float(sys.argv[2]) - time.time())\n"
            "try:\n    lock.acquire(); print('held'); time.sleep(4)\n"
            "except RunLocked:\n    print('refused')\n"
        )
        start = str(time.time() + 2.0)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(run), start],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert outcomes.count("held") == 1, outcomes


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"host": "h"}'])
def test_unreadable_locks_are_named_and_respected(tmp_path, capsys, content):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text(content)
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", run, match=str(run / ".lock"))
    assert (run / ".lock").read_text() == content
