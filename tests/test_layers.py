"""Imports point one way: model and data at the bottom, then train, then analysis, then the
command line (posleak.cli). `__main__.py` files are entry points, part of the command line.
Every import goes through the posleak namespace: a bare `import model` would load a second
copy of the module (or another project's) under a generic top-level name."""

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
RANK = {"model": 0, "data": 0, "posleak": 0, "train": 1, "analysis": 2, "cli": 3, "commands": 3}
FOLDERS = ("model", "data", "train", "analysis", "posleak")


def layer(module: str) -> str | None:
    """The layer of a dotted module name, or None for a module outside posleak."""
    parts = module.split(".")
    if parts[0] != "posleak":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "posleak"


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name a file is installed under: FOLDER/a/b.py is posleak.FOLDER.a.b."""
    parts = path.relative_to(root).with_suffix("").parts
    parts = parts[1:] if parts[0] == "posleak" else parts
    return ".".join(("posleak", *(p for p in parts if p != "__init__")))


def sources(root: Path = ROOT) -> list[Path]:
    """Every module of the five folders, sub-packages included (entry points excepted)."""
    return [
        path
        for folder in FOLDERS
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "__main__.py"
    ]


def problems(path: Path, root: Path = ROOT) -> list[str]:
    own = layer(module_name(path, root))
    out = []
    for name in imports(path):
        other = layer(name)
        if name.split(".")[0] in FOLDERS[:-1]:
            out.append(f"imports {name}: use posleak.{name}")
        elif other and RANK[other] > RANK[own]:
            out.append(f"imports {name}, a layer above {own}")
        elif {own, other} == {"model", "data"}:
            out.append(f"imports {name} (model and data are independent)")
    return out


def test_no_module_imports_a_layer_above_its_own_or_outside_the_namespace():
    found = []
    for path in sources():
        found += [f"{path.relative_to(ROOT)} {p}" for p in problems(path)]
    for path in sorted((ROOT / "tests").glob("*.py")):
        found += [f"{path.relative_to(ROOT)} {p}" for p in problems(path) if ": use posleak." in p]
    assert not found, found


def test_the_checker_sees_an_upward_import_and_a_bare_one(tmp_path):
    bad = tmp_path / "train" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "from posleak.analysis.reports.compare import write_report\nimport torch\nimport data\n"
    )
    assert problems(bad, tmp_path) == [
        "imports posleak.analysis.reports.compare, a layer above train",
        "imports data: use posleak.data",
    ]
    assert RANK[layer("posleak.train.loop")] < RANK[layer("posleak.analysis.reports.compare")]


def test_the_checker_recurses_into_sub_packages(tmp_path):
    """An upward import planted two folders deep (analysis/stages/) is found by the walk."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    deep = tmp_path / "analysis" / "stages" / "planted.py"
    deep.parent.mkdir()
    deep.write_text("from posleak.cli import main\n")
    assert module_name(deep, tmp_path) == "posleak.analysis.stages.planted"
    assert sources(tmp_path) == [deep]
    assert problems(deep, tmp_path) == ["imports posleak.cli, a layer above analysis"]


def test_every_sub_package_is_in_the_wheel():
    """pyproject's hand list of packages names every folder that holds an __init__.py (a new
    sub-package left out would be missing from an installed posleak), and besides them only
    configs/, shipped as data."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {
        module_name(init.parent / "__init__.py") for init in sources() if init.name == "__init__.py"
    }
    assert packages | {"posleak.configs"} == set(config["packages"])
    assert config["package-data"]["posleak.configs"] == ["*.toml", "sweeps/*.toml"]
    for name in packages:
        folder = Path(config["package-dir"][name])
        assert (ROOT / folder / "__init__.py").is_file(), name
