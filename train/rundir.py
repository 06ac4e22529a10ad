"""The run directory: its layout, and how its files are read and written.

    RUN/config.toml           the resolved config (every key; [derived] is informational)
    RUN/env.json              machine, versions, precision, thread count
    RUN/metrics.jsonl         one JSON line per logged step
    RUN/summary.json          written when training finishes
    RUN/sweep.json            a sweep's label of the run (variant, seed, grid point)
    RUN/checkpoints/step_N/   train/checkpoint.py: model folder + optimizer + manifest
    RUN/analysis/             written by `posleak analyze`

Training writes through this module (atomically) and analysis reads through it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from posleak.files import atomic_write
from posleak.model import Decoder
from posleak.train import checkpoint
from posleak.train.config import RunConfig, from_resolved, tomllib
from posleak.train.lock import RunLock


class RunDir:
    """A run directory by path; nothing is read until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.toml"
        self.env_file = self.path / "env.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.sweep_file = self.path / "sweep.json"
        self.checkpoints_dir = self.path / "checkpoints"
        self.analysis_dir = self.path / "analysis"

    def write(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text)

    def lock(self) -> RunLock:
        return RunLock(self.path)

    def read_config(self) -> tuple[RunConfig, int]:
        """The resolved config and the vocabulary size the model was built with."""
        if not self.config_file.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.toml)")
        resolved = tomllib.loads(self.config_file.read_text())
        return from_resolved(self.config_file), resolved["model"]["vocab_size"]

    def summary(self) -> dict | None:
        """summary.json of a finished run, else None."""
        if not self.summary_file.exists():
            return None
        return json.loads(self.summary_file.read_text())

    def sweep_label(self) -> dict:
        """sweep.json: the variant, seed and grid point a sweep gave this run ({} if none)."""
        if not self.sweep_file.exists():
            return {}
        return json.loads(self.sweep_file.read_text())

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return checkpoint.list_checkpoints(self.checkpoints_dir)

    def load_model(self, step: int | None = None) -> tuple[Decoder, RunConfig, dict]:
        """The model at the newest checkpoint that verifies (or at `step`), in eval mode, with
        the run's config and the checkpoint's state (its `checkpoint` path included)."""
        cfg, vocab_size = self.read_config()
        candidates = self.checkpoints()
        if step is not None:
            candidates = [
                p for p in candidates if p == checkpoint.step_dir(self.checkpoints_dir, step)
            ]
            if not candidates:
                kept = [int(p.name.removeprefix("step_")) for p in self.checkpoints()]
                raise FileNotFoundError(
                    f"{self.path} has no checkpoint at step {step}; kept: {kept}"
                )
        if not candidates:
            raise FileNotFoundError(f"{self.path} has no checkpoint yet; train it first")
        model = Decoder(cfg.model_config(vocab_size))
        errors = []
        for path in reversed(candidates):
            try:
                state = checkpoint.load_weights(path, model)
                return model.eval(), cfg, {**state, "checkpoint": str(path)}
            except checkpoint.CheckpointError as err:
                errors.append(str(err))
                warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=2)
        raise FileNotFoundError(
            f"{self.path} has no usable checkpoint ({'; '.join(errors)}); resume training with "
            "`posleak train CONFIG --out RUN --resume` to rewrite it"
        )
