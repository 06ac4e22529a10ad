"""Hostile input and faults, through the real command line: each case gets a one-line error
(no traceback), and nothing on disk is lost or silently wrong."""

import json
import os
import re
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
        "train.threads=4611686018427387904",
        "model.rope_scale=1e308",
        "model.rope_base=1e308",
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


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"n_layer": True, "vocab_size": True}, "n_layer must be a positive integer, got True"),
        ({"window": True}, "window must be a positive integer"),
        ({"d_ff": False}, "d_ff must be a positive integer"),
        ({"norm_eps": True}, "norm_eps must be a number, got True"),
        ({"rope_base": "1e4"}, "rope_base must be a number"),
        ({"tie_embeddings": 1}, "tie_embeddings must be true or false"),
        ({"position": "rope_ntk", "rope_scale": 4.0, "d_model": 4, "n_head": 2}, "d/(d-2)"),
    ],
)
def test_the_python_api_refuses_what_the_config_file_refuses(values, field):
    """True is an int to Python: ModelConfig(n_layer=True) once built a one-layer model."""
    from posleak.model import ModelConfig
    from posleak.model.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(field)):
        ModelConfig(**values)


@pytest.mark.parametrize("ids", [[1, 2, 30], [1, -2, 3]], ids=["above", "negative"])
def test_token_ids_outside_the_vocabulary_are_named_by_the_python_api(ids):
    from posleak.model import Decoder, ModelConfig

    model = Decoder(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\).*from -?\d+ to \d+"):
        model(torch.tensor([ids]))


@pytest.mark.parametrize("result", ["float64", "list"])
def test_a_hook_returning_the_wrong_thing_is_named(result):
    from posleak.model import Decoder, ModelConfig

    model = Decoder(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8))

    def my_hook(pattern, name):
        return pattern.double() if result == "float64" else [1]

    expected = "torch.float64" if result == "float64" else "list"
    with pytest.raises(
        TypeError, match=f"hook 'my_hook' on blocks.0.attn.pattern returned {expected}"
    ):
        with model.hooks([("blocks.0.attn.pattern", my_hook)]):
            model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize(
    ("args", "text"),
    [(["--set", "model=3"], None), ([], "[[train]]\nsteps = 3\n")],
    ids=["set-a-section", "array-of-tables"],
)
def test_a_section_given_a_value_is_named_as_a_section(tmp_path, capsys, args, text):
    config = tiny_config(tmp_path)
    if text:  # alone: beside the tiny config's [train] it would not even be TOML
        config.write_text(text)
    err = one_line_error(capsys, "train", config, *args, "--print-config", match="is a section")
    assert "did you mean" not in err


def test_a_head_dimension_of_two_builds_plain_rope():
    from posleak.model import Decoder, ModelConfig

    model = Decoder(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=4))
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 10)


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--tokens", "100000000"], "--tokens must be between 1 and 65536"),
        (["--tokens", "0"], "--tokens must be between"),
        (["--seed", str(2**70)], "--seed must be in [0, 2^63)"),
        (["--temperature", "nan"], "--temperature must be"),
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


def sweep_under_way(tmp_path, steps: int, ckpt_every: int, lines: int):
    """A one-run sweep in its own process, once its run has logged `lines` metrics records:
    (the sweep's process, the run's folder, the training child's pid)."""
    path = sweep(tmp_path, 'seeds = [0]\n[variants.rope]\nmodel.position = "rope"\n')
    write_config(
        tmp_path / "base.toml", tiny_overrides(train__steps=steps, train__ckpt_every=ckpt_every)
    )
    out = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "posleak", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = out / expand(read_sweep(path))[0].name
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and not (
        metrics.exists() and len(metrics.read_text().split()) > lines
    ):
        time.sleep(0.02)
    return proc, run, json.loads((run / ".lock").read_text())["pid"]


def test_sigterm_to_a_sweep_checkpoints_its_children_and_leaves_no_orphans(tmp_path):
    proc, run, child = sweep_under_way(tmp_path, steps=2000, ckpt_every=500, lines=20)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
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


# ================================================================== round 2
# Each case of the second hostile battery, through the real command line: the one-line error
# (naming the file or key and the fix) and the state on disk afterwards.
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step run (checkpoints at 8 and 12) to copy; never modified."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "tiny.toml", tiny_overrides())
    train(build(tiny_overrides()), root / "run")
    return config, root / "run"


def copy_run(finished, tmp_path) -> tuple[Path, Path]:
    import shutil

    config, run = finished
    shutil.copytree(run, tmp_path / "run")
    return config, tmp_path / "run"


def tree(path: Path) -> dict:
    """{relative path: bytes} of every file under path (links not followed)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


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


def test_seed_in_a_grid_is_refused(tmp_path, capsys):
    path = sweep(tmp_path, "seeds = [0]\n[variants.rope]\n[grid]\nseed = [5, 6]\n")
    one_line_error(capsys, "sweep", path, "--out", tmp_path / "s", match="grid.seed")
    assert not (tmp_path / "s").exists()


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


def test_nul_bytes_anywhere_in_a_file_are_refused(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(b"plain text\n" * 2000 + b"\0" * 50 + b"more\n" * 100)
    config = tiny_config(tmp_path, data__source=str(text), data__cache_dir=str(tmp_path / "c"))
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match="NUL bytes")


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


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--set", f"seed={2**63}"], "seed must be in"),
        (["--set", "model.vocab_size=100000000"], "vocab_size=100000000 is beyond"),
        (["--set", "model.d_ff=1000000000"], "d_ff=1000000000 is beyond"),
        (["--set", "model.max_seq_len=100000000"], "max_seq_len=100000000 is beyond"),
        (["--set", "data.markov_concentration=inf"], "markov_concentration must be finite"),
        (["--set", "preset=nonesuch"], "unknown preset 'nonesuch'"),
        (["--set", "model.d_ff=200000", "--set", "model.d_model=8192"], "GiB"),
    ],
)
def test_unbounded_values_are_refused_before_anything_is_allocated(tmp_path, capsys, args, match):
    one_line_error(
        capsys, "train", tiny_config(tmp_path), *args, "--out", tmp_path / "r", match=match
    )
    assert not (tmp_path / "r").exists()


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


def test_an_absurd_lock_pid_and_deep_includes_are_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": "h", "pid": 10**20}))
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", run, match="no readable owner")
    tiny_config(tmp_path, name="c0.toml")
    for i in range(1, 60):
        (tmp_path / f"c{i}.toml").write_text(f'include = "c{i - 1}.toml"\n')
    one_line_error(
        capsys, "train", tmp_path / "c59.toml", "--out", tmp_path / "x", match="nest deeper"
    )


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


def test_a_utf8_bom_and_a_preset_on_the_command_line_are_accepted(tmp_path, capsys):
    config = tiny_config(tmp_path)
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    args = ["train", str(config), "--set", "preset=swa", "--out", str(tmp_path / "r")]
    assert main([*args, "--print-config"]) == 0
    assert "window = 32" in capsys.readouterr().out and not (tmp_path / "r").exists()
    assert main(args) == 0
    assert "window = 32" in (tmp_path / "r" / "config.toml").read_text()


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


def test_jobs_below_one_is_refused_before_anything_is_written(tmp_path, capsys):
    path = sweep(tmp_path, "seeds = [0]\n[variants.rope]\n")
    for jobs in ("0", "-1"):
        one_line_error(
            capsys, "sweep", path, "--out", tmp_path / "s", "--jobs", jobs, match="--jobs"
        )
    assert not (tmp_path / "s").exists()


def test_a_failed_train_keeps_the_users_own_empty_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    config = tiny_config(tmp_path, data__source=str(tmp_path / "missing.txt"))
    one_line_error(capsys, "train", config, "--out", mine, match="matches no file")
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_analyze_into_a_read_only_folder_fails_before_any_work(
    trained, tmp_path, capsys, monkeypatch
):
    import posleak.analysis.engine.folder as folder

    monkeypatch.setattr(folder.os, "access", lambda path, mode: False)
    monkeypatch.setattr(
        "posleak.analysis.engine.analyze.analysis_of", lambda *a: pytest.fail("work started")
    )
    one_line_error(capsys, "analyze", trained, "--out", tmp_path / "ro", match="read-only")


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


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whoever adopted it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


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


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("data.source", '""', "data.source is empty"),
        ("data.markov_order", str(2**62), "data.markov_order"),
        ("data.induction_copies", str(2**62), "data.induction_copies"),
    ],
)
def test_values_that_would_read_the_wrong_data_or_never_answer_are_refused(
    tmp_path, capsys, key, value, says
):
    """An empty source once trained on every file under the current folder; a Markov order
    of 2^62 computed 64^(2^62) to check its range and never answered; 2^62 induction copies
    looped in the first batch. Each is refused at once, with the key named."""
    extra = ["--set", "data.source=induction"] if "induction" in key else []
    out = tmp_path / "run"
    code = main(["train", "rope", *extra, "--set", f"{key}={value}", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert says in error and "Traceback" not in error
    assert not out.exists()


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    from posleak.data.text import default_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSLEAK_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "posleak"


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
