"""The run directory: its layout, and how its files are read and written.

    RUN/config.toml           the resolved config (every key; [derived] is informational)
    RUN/env.json              machine, versions, precision, thread count
    RUN/metrics.jsonl         one JSON line per logged step
    RUN/summary.json          written when training finishes
    RUN/sweep.json            a sweep's label of the run (variant, seed, grid point)
    RUN/train.log             a sweep's log of the run's command
    RUN/wandb_id.txt, wandb/  the wandb run's id and files (log.wandb = true)
    RUN/checkpoints/step_N/   train/checkpoint.py: model folder + optimizer + manifest
    RUN/analysis/             written by `posleak analyze` (analysis/engine/folder.py)
    RUN/.lock, .lock.guard    train/lock.py: one writer at a time

Training writes through this module (atomically, never through a link) and analysis reads
through it. Every damaged file is named, with what is wrong and the fix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from posleak.files import atomic_write, open_append, refuse_link
from posleak.model import ConfigError, Decoder, ModelConfig
from posleak.train import checkpoint
from posleak.train.config import RunConfig, from_resolved, tomllib
from posleak.train.lock import RunLock

# the names a run directory may hold: anything else means it is not (only) a run
LAYOUT = {
    "config.toml",
    "env.json",
    "metrics.jsonl",
    "summary.json",
    "sweep.json",
    "train.log",
    "wandb_id.txt",
    "wandb",
    "checkpoints",
    "analysis",
    ".lock",
    ".lock.guard",
}
RUN_MADE = ("metrics.jsonl", "checkpoints", "env.json", "summary.json")  # written by training


class RunDirError(ValueError):
    """A run directory, or a file in it, that cannot be used as it is; says why and the fix."""


class RunDir:
    """A run directory by path; nothing is read until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.toml"
        self.env_file = self.path / "env.json"
        self.metrics_file = self.path / "metrics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.sweep_file = self.path / "sweep.json"
        self.log_file = self.path / "train.log"
        self.wandb_id_file = self.path / "wandb_id.txt"
        self.checkpoints_dir = self.path / "checkpoints"

    # ------------------------------------------------------------------ writing
    def write(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text)

    def append(self, name: str):
        """A file of the run opened for appending (metrics.jsonl, train.log); never a link."""
        return open_append(self.path / name)

    def lock(self) -> RunLock:
        return RunLock(self.path)

    def foreign(self) -> list[str]:
        """Names in the folder that no posleak run writes (temporaries and lock records are
        ours)."""
        if not self.path.is_dir():
            return []
        names = sorted(p.name for p in self.path.iterdir())
        return [n for n in names if n not in LAYOUT and not _our_temporary(n)]

    def is_run(self) -> bool:
        """Training wrote here (metrics, checkpoints, env.json or summary.json), beyond the
        config and a sweep's plan."""
        return any(
            (self.path / name).exists() or (self.path / name).is_symlink() for name in RUN_MADE
        )

    def check_for_training(self) -> None:
        """Refuse --out unless it is new, empty, a sweep's planned run, or a run of ours."""
        refuse_link(self.path, "--out")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file; give a directory for the run")
        foreign = self.foreign()
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise RunDirError(
                f"--out {self.path} holds files that are not a posleak run's ({shown}); "
                "posleak writes only into a new or empty folder or a run of its own: pick "
                "another --out"
            )
        for name in sorted(LAYOUT):  # a planted link would redirect our writes
            refuse_link(self.path / name, f"{name} of the run")
        has_own = self.config_file.exists()
        if has_own and not self._wrote_config(damaged_is_ours=self.is_run()):
            raise RunDirError(
                f"{self.config_file} was not written by posleak (no [derived] table of a run); "
                "posleak writes only into a new or empty folder or a run of its own: pick "
                "another --out"
            )
        if self.is_run() and not has_own:
            present = sorted(p.name for p in self.path.iterdir() if p.name in RUN_MADE)
            raise RunDirError(
                f"{self.path} holds a run's files ({', '.join(present)}) but no config.toml, "
                "so it cannot be continued or overwritten safely; restore its config.toml, or "
                "pick another --out"
            )

    def _wrote_config(self, damaged_is_ours: bool) -> bool:
        """config.toml is a run's resolved config. One that does not parse is a run's damaged
        config beside checkpoints or metrics (read_config names the damage), else foreign."""
        try:
            resolved = tomllib.loads(self.config_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            return damaged_is_ours
        return isinstance(resolved.get("derived"), dict) and isinstance(resolved.get("model"), dict)

    # ------------------------------------------------------------------ reading
    def read_config(self) -> tuple[RunConfig, int]:
        """The resolved config and the vocabulary size the model was built with."""
        if not self.config_file.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory (no config.toml)")
        try:
            resolved = tomllib.loads(self.config_file.read_text(encoding="utf-8"))
            vocab_size = resolved["model"]["vocab_size"]
            return from_resolved(self.config_file), vocab_size
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            why = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
            raise RunDirError(
                f"{self.config_file} is damaged ({why}); the run wrote it complete: restore it "
                "from a copy, or train into a new --out"
            ) from None
        except ConfigError as err:
            raise RunDirError(
                f"{self.config_file} does not validate ({err}); restore the file the run wrote"
            ) from None

    def read_json(self, file: Path, kind=dict):
        """A JSON file of the run, of the given kind, or a RunDirError that names it."""
        try:
            value = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(
                f"{file} is damaged (not valid JSON: {err}); delete it and run the command that "
                "writes it again"
            ) from None
        if not isinstance(value, kind):
            raise RunDirError(
                f"{file} holds a {type(value).__name__}, not a {kind.__name__}; delete it and "
                "run the command that writes it again"
            )
        return value

    def summary(self) -> dict | None:
        """summary.json of a finished run, else None."""
        if not self.summary_file.exists():
            return None
        return self.read_json(self.summary_file)

    def sweep_label(self) -> dict:
        """sweep.json: the variant, seed and grid point a sweep gave this run ({} if none)."""
        if not self.sweep_file.exists():
            return {}
        label = self.read_json(self.sweep_file)
        if not isinstance(label.get("variant"), str) or type(label.get("seed")) is not int:
            raise RunDirError(
                f"{self.sweep_file} lacks its variant or seed; run the sweep's command again "
                "to rewrite it"
            )
        return label

    def metrics_lines(self, up_to_step: int) -> list[str]:
        """metrics.jsonl's records up to a step; a damaged line is skipped with a warning that
        names it (a crash can cut off the last line, an edit can break any)."""
        if not self.metrics_file.exists():
            return []
        kept = []
        text = self.metrics_file.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
                step = record["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                warnings.warn(
                    f"{self.metrics_file}: line {number} is not a metrics record; dropped",
                    stacklevel=2,
                )
                continue
            if type(step) is int and step <= up_to_step:
                kept.append(line)
        return kept

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return checkpoint.list_checkpoints(self.checkpoints_dir)

    def model_config(self) -> ModelConfig:
        """The model this run built, from its config.toml (no weights read)."""
        cfg, vocab_size = self.read_config()
        return cfg.model_config(vocab_size)

    def load_model(self, step: int | None = None) -> tuple[Decoder, RunConfig, dict]:
        """The model at the newest checkpoint that verifies (or at `step`), in eval mode, with
        the run's config and the checkpoint's state (its `checkpoint` path included)."""
        cfg, vocab_size = self.read_config()
        model = Decoder(cfg.model_config(vocab_size))
        errors: list[checkpoint.CheckpointError] = []
        for _attempt in range(3):  # a checkpoint pruned while we read: list again
            vanished = False
            for path in reversed(self._candidates(step)):
                try:
                    state = checkpoint.load_weights(path, model)
                    return model.eval(), cfg, {**state, "checkpoint": str(path)}
                except (checkpoint.CheckpointError, OSError) as err:
                    if not path.exists():  # pruned by the run that is training: not damage
                        vanished = True
                        break
                    if isinstance(err, OSError):
                        raise
                    errors.append(err)
                    if not isinstance(err, checkpoint.CheckpointMismatch):
                        warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=2)
            if not vanished:
                break
        if errors and all(isinstance(e, checkpoint.CheckpointMismatch) for e in errors):
            raise RunDirError(
                f"{self.config_file} does not describe its checkpoints ({errors[0].detail}); "
                "restore the config.toml the run wrote"
            )
        raise FileNotFoundError(
            f"{self.path} has no usable checkpoint ({'; '.join(map(str, errors))}); resume "
            "training with `posleak train --resume RUN` to rewrite it"
        )

    def checkpoint_identity(self, step: int | None = None) -> tuple[int, str | None] | None:
        """(step, weights digest) of the checkpoint an analysis at `step` (default: the
        newest) would read now, from the manifest (None where there is none)."""
        try:
            path = self._candidates(step)[-1]
        except FileNotFoundError:
            return None
        return checkpoint.step_of(path), checkpoint.weights_digest(path)

    def _candidates(self, step: int | None) -> list[Path]:
        candidates = self.checkpoints()
        if step is not None:
            wanted = checkpoint.step_dir(self.checkpoints_dir, step)
            kept = [checkpoint.step_of(p) for p in candidates]
            candidates = [p for p in candidates if p == wanted]
            if not candidates:
                raise FileNotFoundError(
                    f"{self.path} has no checkpoint at step {step}; kept: {kept}"
                )
        if not candidates:
            raise FileNotFoundError(f"{self.path} has no checkpoint yet; train it first")
        return candidates


def _our_temporary(name: str) -> bool:
    """Atomic writes' temporaries (.NAME.tmp-...) and lock records (.lock.XXXX)."""
    return name.startswith(".") and (".tmp-" in name or name.startswith(".lock."))
