"""Imports point one way: model and data at the bottom, then train, then analysis, then the
command line (posleak.cli). `__main__.py` files are entry points, part of the command line.
Every import goes through the posleak namespace: a bare `import model` would load a second
copy of the module (or another project's) under a generic top-level name."""

import ast
from pathlib import Path

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


def module_name(path: Path) -> str:
    package = path.parent.name
    return f"posleak.{path.stem}" if package == "posleak" else f"posleak.{package}.{path.stem}"


def problems(path: Path) -> list[str]:
    own = layer(module_name(path))
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
    for package in FOLDERS:
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name != "__main__.py":
                found += [f"{path.relative_to(ROOT)} {p}" for p in problems(path)]
    for path in sorted((ROOT / "tests").glob("*.py")):
        found += [f"{path.relative_to(ROOT)} {p}" for p in problems(path) if ": use posleak." in p]
    assert not found, found


def test_the_checker_sees_an_upward_import_and_a_bare_one(tmp_path):
    bad = tmp_path / "train" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from posleak.analysis.compare import write_report\nimport torch\nimport data\n")
    assert problems(bad) == [
        "imports posleak.analysis.compare, a layer above train",
        "imports data: use posleak.data",
    ]
    assert RANK[layer("posleak.train.loop")] < RANK[layer("posleak.analysis.compare")]
