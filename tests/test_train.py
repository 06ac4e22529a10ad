"""Training: config validation, run directories, checkpoints, exact resume, determinism, DDP."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import deterministic_metrics, tiny_overrides, write_config
from safetensors.torch import load_file

from posleak.model import ConfigError, Decoder
from posleak.train import checkpoint
from posleak.train.config import build, from_resolved, load, parse_override, read_toml
from posleak.train.environment import COMPILE_CPU_MIN_FLOP, resolve_compile
from posleak.train.lock import RunLock, RunLocked
from posleak.train.loop import RunExistsError, TrainingDiverged, train
from posleak.train.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent


def final_weights(run: Path) -> dict:
    last = checkpoint.list_checkpoints(run / "checkpoints")[-1]
    return load_file(str(last / checkpoint.MODEL_FILE))


# ------------------------------------------------------------------ config
def test_unknown_key_names_the_closest_match_and_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        build({"model.n_layers": 2, "train.lr": 1e-3})
    text = str(err.value)
    assert "unknown key 'model.n_layers'; did you mean 'model.n_layer'?" in text
    assert "valid keys:" in text and "train.grad_clip" in text


def test_every_problem_is_reported_together():
    with pytest.raises(ConfigError) as err:
        build(
            {
                "train.lr": "fast",
                "model.d_model": 30,
                "model.n_head": 4,
                "model.position": "nope",
                "model.params.scale": 2.0,
                "data.bos": "sometimes",
            }
        )
    text = str(err.value)
    assert "train.lr: expected float, got str 'fast'" in text
    assert "not divisible by n_head=4" in text
    assert "params.scale=2.0 has no effect with position='nope'" in text
    assert "data.bos must be one of" in text


def test_presets_differ_from_base_only_in_positional_keys():
    base = read_toml(ROOT / "configs" / "base.toml")
    positional = {"model.position", "model.params.base", "model.params.scale", "model.window"}
    for name in ("rope", "ntk", "swa", "nope", "learned"):
        preset = read_toml(ROOT / "configs" / f"{name}.toml")
        changed = {k for k in set(base) | set(preset) if base.get(k) != preset.get(k)}
        assert changed <= positional, (name, changed)
        load(ROOT / "configs" / f"{name}.toml")  # and each one validates


def test_overrides_parse_as_toml_literals():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("model.position=rope") == ("model.position", "rope")
    assert parse_override("log.wandb=true") == ("log.wandb", True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_include_cycle_is_reported(tmp_path):
    (tmp_path / "a.toml").write_text('include = "b.toml"\n')
    (tmp_path / "b.toml").write_text('include = "a.toml"\n')
    with pytest.raises(ConfigError, match="include cycle"):
        read_toml(tmp_path / "a.toml")


# ------------------------------------------------------------------ runs
def test_run_directory_describes_itself_and_is_never_overwritten(tmp_path):
    cfg = build(tiny_overrides(model__position="rope_ntk", model__params__scale=8.0))
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    resolved = from_resolved(run / "config.toml")
    assert resolved.to_dict()["train"] == cfg.to_dict()["train"]
    assert "rope_effective_base = " in (run / "config.toml").read_text()
    env = json.loads((run / "env.json").read_text())
    assert {"versions", "git", "device", "threads", "precision"} <= set(env)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"train_loss", "lr", "tokens", "tokens_per_s"} <= set(records[0])
    assert summary["final_val_loss"] == records[-1]["val_loss"]
    assert len(checkpoint.list_checkpoints(run / "checkpoints")) == 2  # keep_checkpoints
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg, run)


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    cfg = build(tiny_overrides())
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    assert deterministic_metrics(tmp_path / "a/metrics.jsonl") == deterministic_metrics(
        tmp_path / "b/metrics.jsonl"
    )
    other = build(tiny_overrides(seed=1))
    train(other, tmp_path / "c")
    assert deterministic_metrics(tmp_path / "a/metrics.jsonl") != deterministic_metrics(
        tmp_path / "c/metrics.jsonl"
    )


def test_resume_refuses_a_changed_config_but_may_extend_the_budget(tmp_path):
    train(build(tiny_overrides(train__steps=4)), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"train.lr"):
        train(build(tiny_overrides(train__steps=4, train__lr=1e-2)), tmp_path / "run", resume=True)
    first = deterministic_metrics(tmp_path / "run/metrics.jsonl")
    train(build(tiny_overrides(train__steps=8)), tmp_path / "run", resume=True)
    extended = deterministic_metrics(tmp_path / "run/metrics.jsonl")
    assert extended[:4] == first and [r["step"] for r in extended] == list(range(1, 9))


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process mid-run, resume it, compare bit for bit."""
    # long enough that the kill always lands mid-run; no deadline, so a slow machine waits
    values = tiny_overrides(train__steps=1000, train__ckpt_every=7, train__eval_every=50)
    config = write_config(tmp_path / "tiny.toml", values)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = [sys.executable, "-m", "train", str(config), "--set", "train.threads=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*cmd, "--out", str(killed)], cwd=ROOT, env=env)
    metrics = killed / "metrics.jsonl"
    while proc.poll() is None:  # no deadline: the run's work is bounded
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 45:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    subprocess.run([*cmd, "--out", str(killed), "--resume"], cwd=ROOT, env=env, check=True)
    subprocess.run([*cmd, "--out", str(straight)], cwd=ROOT, env=env, check=True)
    assert deterministic_metrics(killed / "metrics.jsonl") == deterministic_metrics(
        straight / "metrics.jsonl"
    )
    a, b = final_weights(killed), final_weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ checkpoints
def test_corrupt_checkpoint_names_the_file_and_resume_falls_back(tmp_path):
    cfg = build(tiny_overrides(train__steps=8, train__keep_checkpoints=3))
    train(cfg, tmp_path / "run")
    ckpts = checkpoint.list_checkpoints(tmp_path / "run/checkpoints")
    newest = ckpts[-1] / checkpoint.MODEL_FILE
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.raises(
        checkpoint.CheckpointError, match=r"model.safetensors: contents do not match"
    ):
        checkpoint.verify(ckpts[-1])
    with pytest.warns(UserWarning, match=r"unusable checkpoint moved .*contents do not match"):
        train(cfg, tmp_path / "run", resume=True)
    checkpoint.verify(ckpts[-1])  # rewritten by the resumed run
    train(cfg, tmp_path / "straight")
    assert deterministic_metrics(tmp_path / "run/metrics.jsonl") == deterministic_metrics(
        tmp_path / "straight/metrics.jsonl"
    )


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    cfg = build(tiny_overrides(train__steps=4))
    train(cfg, tmp_path / "run")
    root = tmp_path / "run/checkpoints"
    before = checkpoint.list_checkpoints(root)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    from posleak.train.loop import Run

    run = Run(build(tiny_overrides(train__steps=6)), tmp_path / "run", resume=True)
    run.step = 5
    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint()
    assert checkpoint.list_checkpoints(root) == before
    assert not list(root.glob(".tmp-*"))
    checkpoint.verify(before[-1])


def test_missing_manifest_means_incomplete(tmp_path):
    train(build(tiny_overrides(train__steps=4)), tmp_path / "run")
    last = checkpoint.list_checkpoints(tmp_path / "run/checkpoints")[-1]
    (last / checkpoint.MANIFEST).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json: missing"):
        checkpoint.verify(last)


def test_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = build(
        tiny_overrides(train__lr=1e4, train__grad_clip=0.0, train__steps=40, train__warmup=0)
    )
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(cfg, tmp_path / "run")
    for ckpt in checkpoint.list_checkpoints(tmp_path / "run/checkpoints"):
        checkpoint.verify(ckpt)


# ------------------------------------------------------------------ distributed
def test_two_ranks_with_batch_b_equal_one_rank_with_batch_2b(tmp_path):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun not installed")
    values = tiny_overrides(train__steps=1, train__batch_size=8, train__warmup=0)
    config = write_config(tmp_path / "tiny.toml", values)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "train",
            str(config),
            "--out",
            str(tmp_path / "ddp"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    train(build(values), tmp_path / "single")
    a, b = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    moved = final_weights(tmp_path / "single")["layers.0.mlp.up_proj.weight"]
    assert not torch.allclose(moved, torch.zeros_like(moved))


def test_run_lock_excludes_a_second_writer_and_takes_over_stale_locks(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLocked, match="in use by"):
        RunLock(tmp_path).acquire()
    with pytest.raises(RunLocked):
        train(build(tiny_overrides()), tmp_path)
    first.release()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / ".lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)})
    )
    stale = RunLock(tmp_path)
    stale.acquire()  # its owner is gone: taken over
    stale.release()
    (tmp_path / ".lock").write_text(json.dumps({"host": "another-machine", "pid": 1}))
    with pytest.raises(RunLocked, match="another-machine"):
        RunLock(tmp_path).acquire()


@pytest.mark.slow
def test_compiled_training_runs_and_learns(tmp_path):
    """torch.compile needs a C++ toolchain and about a minute on CPU: kept out of CI."""
    summary = train(build(tiny_overrides(train__compile=True, train__steps=20)), tmp_path / "run")
    first = deterministic_metrics(tmp_path / "run/metrics.jsonl")[0]["train_loss"]
    assert summary["final_val_loss"] < first


@pytest.mark.parametrize("position", ["rope", "nope"])
def test_compiled_model_equals_eager_at_fp32_tolerance(position):
    """Forward and gradients of torch.compile(Decoder) against eager: 10-20 s each on CPU,
    kept in CI because the benchmark and `train.compile` rely on it."""
    model = Decoder(build(tiny_overrides(model__position=position)).model_config(20))
    tokens = torch.randint(0, 20, (3, 32), generator=torch.Generator().manual_seed(0))
    eager = model(tokens)
    eager.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)(tokens)
    compiled.square().mean().backward()
    assert torch.allclose(compiled, eager, atol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


def test_compile_auto_decides_from_training_flops_and_says_why(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_compile(True, cpu, 0) == (True, "set in the config")
    off, why = resolve_compile("auto", cpu, COMPILE_CPU_MIN_FLOP / 2)
    on, _ = resolve_compile("auto", cpu, COMPILE_CPU_MIN_FLOP)
    assert (off, on) == (False, True) and "TFLOP" in why
    assert resolve_compile("auto", torch.device("cuda"), 1e30)[0] is False  # not measured
    train(build(tiny_overrides(train__compile="auto")), tmp_path / "run")
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["compile"] is False and env["compile_reason"].startswith("auto: ")
    with pytest.raises(ConfigError, match="train.compile must be true, false or"):
        build(tiny_overrides(train__compile="yes"))


def test_the_run_directory_loads_the_newest_good_model_or_a_named_step(tmp_path):
    run = tmp_path / "run"
    train(build(tiny_overrides(model__position="rope_ntk", model__params__scale=2.0)), run)
    run_dir = RunDir(run)
    steps = [int(p.name.removeprefix("step_")) for p in run_dir.checkpoints()]
    assert steps == [8, 12]  # keep_checkpoints = 2
    reference, cfg, state = run_dir.load_model()
    assert state["step"] == 12 and cfg.model["position"] == "rope_ntk"
    x = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(0))
    newest = run_dir.checkpoints()[-1]
    assert torch.equal(Decoder.load(newest)(x), reference(x))  # a checkpoint is a model folder
    earlier, _, state = run_dir.load_model(step=8)
    assert state["step"] == 8 and not torch.equal(earlier(x), reference(x))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5; kept: \[8, 12\]"):
        run_dir.load_model(step=5)
    (newest / "model.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        fallback, _, state = run_dir.load_model()
    assert state["step"] == 8 and torch.equal(fallback(x), earlier(x))


def test_the_schedule_warms_up_holds_then_decays_to_its_floor():
    """lr_at against the closed form: linear warm-up, a plateau until decay_start, a cosine
    from there to lr * min_lr_ratio at the last step; decay_start = 0 is the plain schedule."""
    import math

    from posleak.train.loop import lr_at

    plain = build(tiny_overrides(train__steps=100, train__warmup=10, train__min_lr_ratio=0.1))
    held = build(tiny_overrides(train__steps=100, train__warmup=10, train__min_lr_ratio=0.1,
                                train__decay_start=40))  # fmt: skip
    lr = plain.train.lr

    def cosine(step: int, start: int) -> float:
        return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * (step - start) / (100 - start)))

    for step in range(100):
        warm = lr * (step + 1) / 10
        assert lr_at(step, plain) == pytest.approx(warm if step < 10 else cosine(step, 10))
        expected = warm if step < 10 else lr if step < 40 else cosine(step, 40)
        assert lr_at(step, held) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="decay_start must be >= 0"):
        build(tiny_overrides(train__decay_start=-1))
