"""The stages' written contract (analysis/stages/base.py: Bench): a stage reads of the
analysis it runs in only what the contract names, and the engine's Analysis provides it all."""

import ast
from pathlib import Path

from posleak.analysis.engine.analyze import Analysis
from posleak.analysis.stages.base import Bench

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = set(Bench.__annotations__) | {n for n in vars(Bench) if not n.startswith("_")}


def reads(source: str) -> set[str]:
    """Every attribute read of a parameter named `analysis`, in every function."""
    found = set()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef) and "analysis" in [a.arg for a in fn.args.args]:
            found |= {
                node.attr
                for node in ast.walk(fn)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "analysis"
            }
    return found


def test_every_stage_reads_only_the_contract():
    stages = sorted((ROOT / "analysis/stages").glob("*.py"))
    assert len(stages) > 15
    for path in stages:
        outside = reads(path.read_text()) - CONTRACT
        assert not outside, f"{path.name} reads {sorted(outside)}: add them to Bench or pass them"
    planted = "def run(self, analysis, ctx):\n    return analysis.timings, analysis.opts\n"
    assert reads(planted) - CONTRACT == {"timings"}  # a read outside it is caught


def test_the_engine_provides_the_whole_contract():
    init = next(
        fn
        for fn in ast.walk(ast.parse((ROOT / "analysis/engine/analyze.py").read_text()))
        if isinstance(fn, ast.FunctionDef) and fn.name == "__init__"
    )
    assigned = {
        target.attr
        for node in ast.walk(init)
        if isinstance(node, ast.Assign)
        for tuple_ in node.targets
        for target in (tuple_.elts if isinstance(tuple_, ast.Tuple) else [tuple_])
        if isinstance(target, ast.Attribute)
    }
    methods = {name for name in CONTRACT if callable(getattr(Analysis, name, None))}
    assert CONTRACT - assigned - methods == set()
    assert {"measure", "tokens", "design", "halves", "set_rope_scale"} <= methods
