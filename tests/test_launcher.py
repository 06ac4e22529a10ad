"""`posleak sweep --launcher`: runs submitted as submitit jobs (its local executor here, the
same code path as SLURM's), gathered where compare and study read them, and a preempted job
requeued and resumed to exactly the numbers of an uninterrupted run."""

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import deterministic_metrics, tiny_overrides, write_config

from posleak.train.launcher import gather, submit
from posleak.train.sweep import expand, read_sweep, write_plan

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same numbers everywhere


def sweep_file(tmp_path, steps: int, seeds: str) -> Path:
    changes = dict(train__steps=steps, train__ckpt_every=50, train__eval_every=50)
    write_config(tmp_path / "base.toml", tiny_overrides(**changes, train__log_every=50))
    path = tmp_path / "sweep.toml"
    path.write_text(f'base = "base.toml"\nseeds = {seeds}\n[variants.rope]\npreset = "rope"\n')
    return path


def posleak(*args):
    env = {**os.environ, **ONE_THREAD}
    cmd = [sys.executable, "-m", "posleak", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def preempt(job) -> None:
    """What SLURM does on preemption: USR2 to the job's own process (the local controller's
    child; submitit's LocalJob._interrupt signals the controller, which does not forward it)."""
    from submitit.local.local import LocalJobEnvironment

    controller = job._process.pid
    (task,) = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    os.kill(int(task), LocalJobEnvironment._usr_sig())


def test_a_launched_sweep_gives_the_plain_sweeps_runs(tmp_path):
    path = sweep_file(tmp_path, steps=20, seeds="[0, 1]")
    launched = posleak("sweep", path, "--out", tmp_path / "launched", "--launcher", "local",
                       "--launcher-set", "timeout_min=10")  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "2 runs submitted (local" in launched.stdout
    plain = posleak("sweep", path, "--out", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "plain").glob("rope-s*"))
    assert len(runs) == 2
    for name in runs:
        a, b = (deterministic_metrics(tmp_path / f / name / "metrics.jsonl") for f in
                ("launched", "plain"))  # fmt: skip
        assert a == b and a[-1]["step"] == 20
    assert (tmp_path / "launched" / "summary.md").read_text().count("| done |") == 2
    bad = posleak("sweep", path, "--out", tmp_path / "bad", "--launcher", "local",
                  "--launcher-set", "no_such_parameter=3")  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error") and "no_such_parameter" in bad.stderr, bad.stderr


def test_a_preempted_job_is_requeued_and_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)
    path = sweep_file(tmp_path, steps=400, seeds="[0]")
    spec = read_sweep(path)
    runs = expand(spec)
    sweep_dir = tmp_path / "launched"
    write_plan(sweep_dir, runs, {})
    [(run, job)] = submit(sweep_dir, runs, "local", {"timeout_min": 10})
    checkpoints = sweep_dir / run.name / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # a first checkpoint exists: there is something to resume from
    assert not (sweep_dir / run.name / "summary.json").exists(), "finished before the signal"
    preempt(job)
    monkeypatch.setattr("posleak.train.launcher.PROGRESS_EVERY_S", 0.0)  # a line each poll
    said = []
    gather(sweep_dir, runs, [(run, job)], report=said.append)
    assert run.status == "done", run.error
    progress = [line for line in said if line.startswith("[sweep] 0/1 done | running: ")]
    assert progress and f"{run.name} " in progress[0] and "/400 | elapsed" in progress[0]
    assert said[-1] == f"[sweep] {run.name}: done (job {job.job_id})"
    log = (sweep_dir / run.name / "train.log").read_text()
    assert "resuming" in log and "from step" in log  # resumed, not started over
    reference = posleak("train", sweep_dir / "configs" / f"{run.name}.toml", "--out",
                        tmp_path / "reference")  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert deterministic_metrics(sweep_dir / run.name / "metrics.jsonl") == deterministic_metrics(
        tmp_path / "reference" / "metrics.jsonl"
    )
