"""`posleak train CONFIG [--set key=value ...] [--out DIR] [--resume]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from posleak.model import ConfigError
from posleak.train import config as run_config
from posleak.train.checkpoint import CheckpointError
from posleak.train.lock import RunLocked
from posleak.train.loop import RunExistsError, RunInterrupted, TrainingDiverged, train


def run(args: argparse.Namespace) -> int:
    try:
        cfg = run_config.load(args.config, args.overrides)
        out = Path(args.out or f"runs/{Path(args.config).stem}-s{cfg.seed}")
        summary = train(cfg, out, resume=args.resume)
    except RunInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except (ConfigError, RunExistsError, RunLocked, CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run: {out}")
        print(
            f"final validation loss: {summary['final_val_loss']:.4f} after {summary['steps']} steps"
        )
    return 0
