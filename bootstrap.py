"""Set up a virtual environment and run posleak's main job or its tests, from a fresh clone.

    python3 bootstrap.py run    # set up, train the default variant, analyse it
    python3 bootstrap.py test   # set up, lint, run the test suite

Needs only Python 3.10+ and git. The environment lives in .venv (POSLEAK_VENV overrides)
and is reinstalled only when pyproject.toml changes; `run` installs what training and
analysis need, `test` adds the test and integration stack. Afterwards `posleak` is
.venv/bin/posleak (or on PATH after `source .venv/bin/activate`). Without an NVIDIA GPU
it installs a CPU build of torch (POSLEAK_TORCH overrides the requirement, e.g.
"torch==2.13.0").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("POSLEAK_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CPU_TORCH = "torch==2.13.0"


def torch_install_args() -> list[str]:
    if "POSLEAK_TORCH" in os.environ:
        return [os.environ["POSLEAK_TORCH"]]
    if shutil.which("nvidia-smi"):
        return ["torch>=2.3"]  # PyPI's default Linux wheel is the CUDA build
    # torch alone from the CPU index (its dependencies come from PyPI with posleak's): an
    # index that cannot be reached then costs one lookup, not one per dependency
    return ["--no-deps", "--retries", "1", "--extra-index-url", CPU_INDEX, CPU_TORCH]


def setup(dev: bool) -> None:
    """posleak and what its main job needs; with dev, also the test and integration stack."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    key += " " + " ".join(torch_install_args())
    stamp = VENV / ".posleak-installed"
    have = stamp.read_text() if stamp.exists() else ""
    if have == key + " dev" or (have == key + " main" and not dev):
        return
    print(f"[bootstrap] setting up {VENV} ({'tests' if dev else 'main job'})", flush=True)
    if Path(sys.prefix).resolve() != VENV.resolve():  # its own python cannot be replaced
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *torch_install_args()], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]" if dev else str(ROOT)], check=True)
    stamp.write_text(key + (" dev" if dev else " main"))


def run(*cmd: str) -> None:
    print("[bootstrap] $", " ".join(cmd), flush=True)
    code = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT).returncode
    if code:
        sys.exit(code)


def main() -> None:
    job = sys.argv[1] if len(sys.argv) > 1 else ""
    if job not in ("run", "test"):
        sys.exit(__doc__)
    setup(dev=job == "test")
    if job == "run":
        run_dir = "runs/quickstart/rope"
        run("posleak", "train", "configs/rope.toml", "--out", run_dir, "--resume")
        run("posleak", "analyze", run_dir)
    elif job == "test":
        run("ruff", "check", ".")
        run("ruff", "format", "--check", ".")
        run("python", "-m", "pytest", "-n", "2", *sys.argv[2:])


if __name__ == "__main__":
    main()
