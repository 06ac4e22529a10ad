"""The installed wheel exposes posleak under one name and works away from the checkout."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("posleak", "model", "data", "train", "analysis", "configs")

PROBE = """
import sys
sys.path[:0] = [{target!r}]
sys.path.append({site!r})  # torch and numpy, without the .pth files of the checkout's install
import posleak, posleak.model, posleak.data, posleak.train.loop, posleak.analysis.reports.compare
import posleak.cli
import torch
assert posleak.__file__.startswith({target!r}), posleak.__file__
assert posleak.model.__file__.startswith({target!r}), posleak.model.__file__
model = posleak.model.Decoder(posleak.model.ModelConfig(n_layer=1, d_model=16, n_head=2))
print(tuple(model(torch.zeros(1, 5, dtype=torch.long)).shape))
from posleak.train.config import presets
assert {{"rope", "ntk", "swa", "sink", "nope", "learned"}} <= set(presets()), presets()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("model", "data", "train", "analysis")))
import os
from posleak.cli import main
os.chdir({work!r})  # a folder of the user's, no checkout: the README's sweeps need configs/
assert main(["sweep", "configs/sweeps/variants.toml", "--print-config"]) == 2
assert main(["init"]) == 0 and os.path.isfile("configs/sweeps/sinks.toml")
assert main(["sweep", "configs/sweeps/variants.toml", "--print-config"]) == 0
assert main(["train", "configs/sinks.toml", "--print-config"]) == 0
assert main(["init"]) == 0  # what is there already is kept
"""


def test_wheel_installs_one_namespace_and_imports_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # setuptools writes build/ into the tree it builds
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("posleak-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"posleak"}
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True)
    work = tmp_path / "work"
    work.mkdir()
    code = PROBE.format(target=str(target), site=sysconfig.get_paths()["purelib"], work=str(work))
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["(1, 5, 259)", "[]"]
