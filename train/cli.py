"""`posleak train CONFIG|PRESET [--set key=value ...] [--out DIR] [--resume] [--print-config]`,
or `posleak train --resume RUN [--set train.steps=N ...]` to continue a run from its own config.
PRESET names a variant of train/presets.toml (rope, ntk, swa, sink, nope, learned, alibi) on the
built-in defaults, so an installed posleak trains without a config file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from posleak.data import vocab_size_of
from posleak.model import ConfigError
from posleak.train import config as run_config
from posleak.train.checkpoint import CheckpointError
from posleak.train.config import parse_override
from posleak.train.lock import RunLocked
from posleak.train.loop import (
    RESUMABLE_CHANGES,
    RunExistsError,
    RunInterrupted,
    TrainingDiverged,
    train,
)
from posleak.train.rundir import RunDir, RunDirError


def resolve(args: argparse.Namespace) -> tuple[run_config.RunConfig, Path, bool]:
    """The config, the run directory and whether to resume, from the command line."""
    if isinstance(args.resume, str):  # --resume RUN: the run's own config
        if args.config or args.out:
            raise ConfigError(
                "--resume RUN continues RUN from its own config.toml: give no CONFIG or --out "
                "(or use: posleak train CONFIG --out RUN --resume)"
            )
        run = RunDir(args.resume)
        if not run.config_file.is_file():
            raise ConfigError(f"--resume {run.path}: not a run directory (no config.toml)")
        fixed = [
            k for k, _ in map(parse_override, args.overrides) if not k.startswith(RESUMABLE_CHANGES)
        ]
        if fixed:
            raise ConfigError(
                f"--set {', '.join(fixed)}: only {', '.join(RESUMABLE_CHANGES)} may change when "
                "a run is resumed; train another config into a new --out"
            )
        run.read_config()  # names a damaged config.toml with the fix
        return run_config.load(run.config_file, args.overrides), run.path, True
    if not args.config:
        raise ConfigError("give a CONFIG file to train, or --resume RUN to continue a run")
    if not Path(args.config).exists() and args.config in run_config.presets():
        # a preset by name: the built-in defaults plus its keys (no config file needed)
        cfg = run_config.load(None, [f"preset={args.config}", *args.overrides])
    else:
        cfg = run_config.load(args.config, args.overrides)
    return cfg, Path(args.out or f"runs/{Path(args.config).stem}-s{cfg.seed}"), bool(args.resume)


def run(args: argparse.Namespace) -> int:
    try:
        cfg, out, resume = resolve(args)
        if args.print_config:
            model = cfg.model_config(vocab_size_of(cfg.data))  # every model key, as built
            print(run_config.to_toml(cfg, model), end="")
            return 0
        summary = train(cfg, out, resume=resume)
    except RunInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except (
        ConfigError,
        RunExistsError,
        RunDirError,
        RunLocked,
        CheckpointError,
        TrainingDiverged,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run: {out}")
        print(
            f"final validation loss: {summary['final_val_loss']:.4f} after {summary['steps']} steps"
        )
    return 0
