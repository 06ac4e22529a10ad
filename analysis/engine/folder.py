"""The analysis folder: its layout, and the one place its files are written and read.

    ANALYSIS/records.jsonl   tidy rows (analysis/engine/records.py)
    ANALYSIS/analysis.json   headline numbers and options (analysis/engine/summary.py); a run's
                             own summary.json is training's, never this
    ANALYSIS/report.png      the overview figure (analysis/reports/plots.py)
    ANALYSIS/report.md       the per-layer numbers beside the figure (analysis/engine/summary.py)
    ANALYSIS/.lock           one writer at a time (train/lock.py)

A run's analysis is RUN/analysis; a pretrained model's is analyses/NAME (or --out). Writes
are atomic, never through a link, and under the folder's lock, so two analyses of one folder
never mix their rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from posleak.analysis.engine import records
from posleak.files import atomic_write, check_owned, owned_dir, refuse_link
from posleak.train.lock import RunLock, RunLocked

WAIT_S = 300.0  # how long an analysis waits for another one's writes to the same folder


class AnalysisDir:
    """An analysis folder by path; nothing is read until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records_file = self.path / "records.jsonl"
        self.summary_file = self.path / "analysis.json"
        self.report_file = self.path / "report.md"

    @staticmethod
    def is_analysis(path: str | Path) -> bool:
        folder = AnalysisDir(path)
        return folder.summary_file.is_file() and folder.records_file.is_file()

    def check_writable(self) -> None:
        """Fail before any work if the folder could not be written (a file, a link, read-only,
        a folder of someone else's files)."""
        refuse_link(self.path, "analysis folder")
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file; give a folder for the analysis")
        check_owned(self.path, "analysis folder", AnalysisDir.is_analysis)
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(
                f"cannot write the analysis into {self.path}: {existing} is read-only; give "
                "--out a folder you can write"
            )

    @contextlib.contextmanager
    def writing(self):
        """The folder, created and locked for one analysis's writes."""
        owned_dir(self.path, "analysis folder", AnalysisDir.is_analysis)
        lock = RunLock(self.path)
        waited = 0.0
        while True:  # another analysis holds it only while it writes: wait for it
            try:
                lock.acquire()
                break
            except RunLocked:
                if waited >= WAIT_S:
                    raise
                time.sleep(0.2)
                waited += 0.2
        try:
            yield self
        finally:
            lock.release()

    def write(self, rows: list[dict], summary: dict) -> None:
        """records.jsonl and analysis.json, each atomically (inside writing()). The run is
        stored relative to this folder and the checkpoint relative to the run, so that a
        moved or copied tree of runs still reads; read_summary() resolves them again."""
        stored = dict(summary)
        if _is_local(stored.get("run")):
            run = Path(stored["run"]).absolute()
            stored["run"] = os.path.relpath(run, self.path.absolute())
            if stored.get("checkpoint"):
                stored["checkpoint"] = os.path.relpath(Path(stored["checkpoint"]).absolute(), run)
        atomic_write(self.records_file, "".join(json.dumps(row) + "\n" for row in rows))
        atomic_write(self.summary_file, json.dumps(stored, indent=2) + "\n")

    def write_report(self, markdown: str) -> None:
        atomic_write(self.report_file, markdown)

    def read_records(self) -> list[dict]:
        rows = records.read(self.records_file)
        if not rows:
            raise ValueError(
                f"{self.records_file} holds no records; run `posleak analyze` again to rewrite it"
            )
        return rows

    def read_summary(self) -> dict:
        try:
            summary = json.loads(self.summary_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{self.summary_file} cannot be read ({err}); run `posleak analyze` again to "
                "rewrite it"
            ) from None
        if not isinstance(summary, dict) or "variant" not in summary:
            raise ValueError(
                f"{self.summary_file} is not an analysis summary (no variant); run `posleak "
                "analyze` again to rewrite it"
            )
        layers = summary.get("per_layer")
        if isinstance(layers, dict):  # JSON keys are strings: a layer is an int again
            summary["per_layer"] = {
                name: {int(l): v for l, v in curve.items()} if isinstance(curve, dict) else curve
                for name, curve in layers.items()
            }
        if _is_local(summary.get("run")):
            run = os.path.normpath(self.path.absolute() / summary["run"])
            summary["run"] = run
            if summary.get("checkpoint"):
                summary["checkpoint"] = os.path.normpath(Path(run) / summary["checkpoint"])
        return summary


def _is_local(run) -> bool:
    """A run folder's path, not a pretrained model's hf: name."""
    return isinstance(run, str) and bool(run) and not run.startswith("hf:")
