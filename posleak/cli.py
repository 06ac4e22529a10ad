"""The `posleak` command: train, sweep, analyze, compare, bench."""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "train": ("train.cli", "train one variant from a config into a run directory"),
    "sweep": ("train.sweep", "run variants x seeds (x grid) with everything else matched"),
    "analyze": ("analysis.analyze", "measure where absolute position emerges in one run"),
    "compare": ("analysis.compare", "report the variants of several runs or sweeps side by side"),
    "bench": ("train.bench", "measure training, data and analysis speed against the matmul peak"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="posleak", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
        modules[name] = module
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


def standalone(module_doc: str, prog: str, add_arguments, run, argv=None) -> int:
    """`python -m MODULE ...`: the same arguments and behaviour as the posleak subcommand."""
    parser = argparse.ArgumentParser(prog=prog, description=module_doc)
    add_arguments(parser)
    return run(parser.parse_args(argv))
