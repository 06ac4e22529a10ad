"""What made an analysis or a report: posleak's version and git commit (with a dirty flag
when the code, not the docs a report writes into, has uncommitted changes), the versions of
the packages that compute its numbers, and the command line that regenerates it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from posleak import version

ROOT = Path(__file__).resolve().parents[2]  # the checkout, when posleak runs from one
PACKAGES = ("torch", "numpy", "scipy", "transformers", "gguf")
SOURCES = ("model", "data", "train", "analysis", "posleak", "pyproject.toml")  # what computes


def provenance() -> dict:
    commit, dirty = _git()
    return {
        "posleak": version(),
        "commit": commit,
        "dirty": dirty,
        "packages": {name: _version(name) for name in PACKAGES},
        "command": shlex.join(["posleak", *sys.argv[1:]]) if _from_cli() else None,
    }


def line(found: dict) -> str:
    """One sentence for a report's header."""
    commit = found.get("commit")
    code = f"commit {commit[:10]}" + (" with uncommitted changes" if found.get("dirty") else "")
    packages = ", ".join(f"{k} {v}" for k, v in found.get("packages", {}).items() if v)
    made = f"posleak {found.get('posleak')} ({code if commit else 'no git checkout'}); {packages}"
    command = found.get("command")
    return made + (f". Regenerate with `{command}`." if command else ".")


def _git() -> tuple[str | None, bool | None]:
    if not (ROOT / ".git").exists():
        return None, None
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        status = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                *SOURCES,
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _from_cli() -> bool:
    return Path(sys.argv[0]).name in ("posleak", "__main__.py") or sys.argv[0] == "-m"
