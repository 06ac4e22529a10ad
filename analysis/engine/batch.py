"""Many analyses at once: each in a worker process with one torch thread (two one-thread
analyses side by side beat one two-thread analysis on a small machine), with one progress
line over the whole batch. jobs = 1 runs them here, in order."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from posleak.analysis.engine.analyze import analyze
from posleak.analysis.engine.options import Options
from posleak.log import clock, log


def analyse_all(work: list[tuple[Path, Options, Path | None]], jobs: int, tag: str) -> None:
    """Analyse every (run, options, output folder or None for the run's own) in `work`."""
    if not work:
        return
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    started, total = time.monotonic(), len(work)

    def done(k: int, run) -> None:
        elapsed = time.monotonic() - started
        eta = elapsed / k * (total - k)
        log.info(
            f"[{tag}] analysed {k}/{total}: {run} | elapsed {clock(elapsed)} | eta {clock(eta)}"
        )

    if jobs == 1 or total == 1:
        for k, (run, opts, out) in enumerate(work, start=1):
            log.info(f"[{tag}] analysing {k}/{total}: {run}")
            analyze(run, opts, out)
            done(k, run)
        return
    context = multiprocessing.get_context("spawn")  # no torch threads forked mid-flight
    workers = min(jobs, total)
    with ProcessPoolExecutor(
        workers, context, initializer=_one_thread, initargs=(os.getpid(),)
    ) as pool:
        futures = {pool.submit(analyze, run, opts, out): run for run, opts, out in work}
        for k, future in enumerate(as_completed(futures), start=1):
            future.result()  # a failed analysis stops the batch with its own error
            done(k, futures[future])


def _one_thread(parent: int) -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("posleak").setLevel(logging.WARNING)  # the parent reports progress
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A worker outlives nothing: when the process that started it is gone (killed, even by
    SIGKILL, which runs no cleanup; perhaps before this worker had even started) it stops
    within a second instead of finishing an analysis nobody waits for."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(143)
