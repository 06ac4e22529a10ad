"""When an analysis already made is reused: the one rule every report and study applies, and
the batch that makes the others."""

from __future__ import annotations

from pathlib import Path

from posleak.analysis import stages
from posleak.analysis.engine.batch import analyse_all
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.options import Options
from posleak.analysis.maths.measures import DEFINITIONS
from posleak.train.rundir import RunDir


def is_current(summary: dict, opts: Options | None, digest: str | None = None) -> bool:
    """An analysis is reused when made under today's definitions by today's stages, of the
    checkpoint the run holds now (its step and weights digest: a run resumed or retrained
    since is analysed again) or of the GGUF file whose sha256 is `digest`, and, where `opts`
    is given, with exactly those options (a study states the options its report used)."""
    return (
        summary.get("definitions") == DEFINITIONS
        and (opts is None or Options.of_summary(summary) == opts)
        and summary.get("stages") == stages.enabled(Options.of_summary(summary))
        and summary.get("gguf_sha256") == digest
        and same_checkpoint(summary)
    )


def same_checkpoint(summary: dict) -> bool:
    """Whether the run an analysis was made of still holds the checkpoint it read (always
    true of an analysis without a posleak run around it: a pretrained model's)."""
    run = RunDir(summary.get("run") or "")
    if not run.config_file.exists():
        return True
    step = Options.of_summary(summary).step
    now = run.checkpoint_identity(step)
    return now is not None and now == (summary.get("step"), summary.get("checkpoint_digest"))


def current_in(folder: AnalysisDir, opts: Options | None, digest: str | None = None) -> bool:
    """Whether `folder` holds an analysis `is_current` would reuse."""
    return folder.summary_file.exists() and is_current(folder.read_summary(), opts, digest)


def make_missing(wanted: list[tuple[Path, Options, Path]], jobs: int, tag: str) -> None:
    """Analyse every (run, options, folder) whose folder holds no current analysis with
    those options, `jobs` at a time."""
    todo = [(run, opts, out) for run, opts, out in wanted if not current_in(AnalysisDir(out), opts)]
    analyse_all(todo, jobs, tag)
