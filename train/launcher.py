"""`posleak sweep FILE --launcher slurm|local`: every run of a sweep as one submitit job.

submitit (an optional extra: `pip install -e '.[cluster]'`) submits each run's `posleak train
CONFIG --out RUN --resume` as a SLURM job (`slurm`) or a local process with the same
semantics (`local`). On preemption or timeout submitit signals the job; the job asks its
training child to checkpoint (SIGTERM, as a sweep's Ctrl-C does) and is requeued, and the
requeued job resumes the run exactly. The results land in the sweep folder as a plain sweep
leaves them (RUN/summary.json, summary.md), so `compare` and `study` read them unchanged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from posleak.train.rundir import RunDir
from posleak.train.sweep import (
    PROGRESS_EVERY_S,
    PlannedRun,
    command,
    progress_line,
    write_summary,
)

LAUNCHERS = ("local", "slurm")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ValueError(
            "--launcher needs submitit: pip install -e '.[cluster]' in posleak's clone"
        ) from None
    return submitit


class TrainJob:
    """One run's training as a submitit job: checkpointable, so that a preempted job is
    requeued and resumes the run rather than starting it again."""

    def __init__(self, cmd: list[str], out: str):
        self.cmd, self.out = cmd, out
        self._child: subprocess.Popen | None = None

    def __call__(self) -> dict:
        run = RunDir(self.out)
        run.path.mkdir(parents=True, exist_ok=True)
        with run.append("train.log") as log:
            self._child = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
            code = self._child.wait()
        if code != 0:
            raise RuntimeError(f"training {self.out} exited with {code}: see its train.log")
        return run.summary()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit in the job on preemption or timeout: the child checkpoints and
        stops, and the same command, with --resume, is requeued."""
        if self._child is not None and self._child.returncode is None:
            self._child.send_signal(signal.SIGTERM)
            # os.waitpid, not Popen.wait: this runs in a signal handler that interrupted
            # __call__'s own Popen.wait, which holds the lock a second wait would block on
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._child.pid, 0)
        return _submitit().helpers.DelayedSubmission(TrainJob(self.cmd, self.out))

    def __getstate__(self) -> dict:  # a running child is not part of what is requeued
        return {"cmd": self.cmd, "out": self.out, "_child": None}


def submit(sweep_dir: Path, runs: list[PlannedRun], launcher: str, parameters: dict) -> list:
    """Submit every valid run without a summary; [(run, job)]. `parameters` go to submitit's
    update_parameters (timeout_min, slurm_partition, gpus_per_node, ...)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {launcher!r}")
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=sweep_dir / "submitit", cluster=launcher)
    try:
        executor.update_parameters(**parameters)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--launcher-set: {err}") from None
    jobs = []
    for run in sorted((r for r in runs if r.error is None), key=lambda r: r.seed):
        if RunDir(sweep_dir / run.name).summary_file.exists():
            run.status = "done"
            continue
        cmd = [sys.executable, "-m", "posleak", *command(sweep_dir, run)[1:]]
        job = executor.submit(TrainJob(cmd, str(sweep_dir / run.name)))
        run.status = "running"  # queued or training: its step shows in the progress line
        jobs.append((run, job))
    write_summary(sweep_dir, runs)
    return jobs


def gather(sweep_dir: Path, runs: list[PlannedRun], jobs: list, report=print) -> None:
    """Wait for every job: a line per run as it ends, a progress line every PROGRESS_EVERY_S
    (runs done, each run's step, ETA), and the sweep's summary."""
    started = last = time.monotonic()
    pending = list(jobs)
    while pending:
        for run, job in [p for p in pending if p[1].done()]:
            pending.remove((run, job))
            try:
                job.result()
                run.status = "done"
            except Exception as err:  # a failed job never stops the others
                run.status, run.error = "failed", str(err).strip().splitlines()[-1][:300]
            report(f"[sweep] {run.name}: {run.status} (job {job.job_id})")
            write_summary(sweep_dir, runs)
        if pending and time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            report(progress_line(sweep_dir, [r for r, _ in jobs], last - started))
        if pending:
            time.sleep(0.5)
