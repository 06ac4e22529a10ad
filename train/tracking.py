"""Weights & Biases logging for a run: the mode the user's environment allows, a run id made by
posleak (stable across resumes), and the full resolved config with readable names."""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path

from posleak.log import log
from posleak.train.rundir import RunDir


def require_wandb():
    """The wandb module, or a one-line error that says how to install it (checked before the
    run directory is made)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "log.wandb = true needs the wandb package: pip install -e '.[wandb]' in posleak's "
            "clone (or set log.wandb = false)"
        ) from None
    return wandb


def mode(environ=os.environ, netrc_file: str | None = None) -> tuple[str, str]:
    """(wandb mode, why): WANDB_MODE wins; else online with a key or stored `wandb login`
    credentials; else offline, and the reason says so."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"], "set by WANDB_MODE"
    if environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    try:
        stored = netrc.netrc(netrc_file).authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        stored = None
    if stored:
        return "online", "credentials stored by `wandb login`"
    return "offline", "no WANDB_API_KEY and no `wandb login` credentials: logging offline"


def open_run(out: Path, project: str, config: dict):
    """Start or resume the wandb run of the run directory `out`."""
    wandb = require_wandb()
    run_dir = RunDir(out)
    id_file = run_dir.wandb_id_file
    if not id_file.exists():
        run_dir.write(id_file.name, secrets.token_hex(6) + "\n")
    chosen, why = mode()
    log.info(f"[wandb] mode {chosen} ({why})")
    label = run_dir.sweep_label()
    tags = [str(label.get("variant", "")), f"seed={config.get('seed')}"]
    return wandb.init(
        project=project,
        id=id_file.read_text().strip(),
        resume="allow",
        dir=str(out),
        mode=chosen,
        name=out.name,
        group=out.parent.name if label else None,
        tags=[t for t in tags if t],
        config=config,
    )
