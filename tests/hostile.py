"""What the hostile-input tests share: the command line with its error captured, tiny
configs and damaged files."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import tiny_overrides, write_config
from safetensors.torch import load_file

from posleak.cli import main
from posleak.data import DataConfig
from posleak.data.text import TextCorpus
from posleak.train import checkpoint
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


def weights(run: Path, step: int) -> dict:
    return load_file(str(checkpoint.step_dir(run / "checkpoints", step) / "model.safetensors"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def text_corpus(tmp_path, content: bytes = b"hello world\n" * 200):
    source = tmp_path / "text.txt"
    source.write_bytes(content)
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), seq_len=16)
    return cfg, TextCorpus(str(source), [content], 0.05, cfg.cache_dir)


def sweep(tmp_path, body: str) -> Path:
    write_config(tmp_path / "base.toml", tiny_overrides(train__steps=2))
    path = tmp_path / "sweep.toml"
    path.write_text('base = "base.toml"\n' + body)
    return path


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


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by whoever adopted it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status
