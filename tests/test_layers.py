"""Imports point one way: model and data at the bottom, then train, then analysis, then the
command line (posleak.cli). `__main__.py` files are entry points, part of the command line."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"model": 0, "data": 0, "posleak": 0, "train": 1, "analysis": 2, "posleak.cli": 3}


def layer(module: str) -> str | None:
    """The layer a dotted module name belongs to, or None for a third-party module."""
    if module == "posleak.cli" or module.startswith("posleak.cli."):
        return "posleak.cli"
    top = module.split(".")[0]
    return top if top in RANK else None


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for package in ("model", "data", "train", "analysis", "posleak"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name == "__main__.py":
                continue
            own = layer(f"{package}.{path.stem}")
            for name in imports(path):
                other = layer(name)
                if other and RANK[other] > RANK[own]:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
                if {own, other} == {"model", "data"}:
                    upward.append(
                        f"{path.relative_to(ROOT)} imports {name} (model and data are independent)"
                    )
    assert not upward, upward


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from analysis.compare import write_report\nimport torch\n")
    assert [layer(n) for n in imports(bad)] == ["analysis", None]
    assert RANK[layer("train.loop")] < RANK[layer("analysis.compare")]
