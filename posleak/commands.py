"""The command handlers: each turns parsed arguments into calls of the library and prints the
command's result. Errors propagate to posleak/cli.py, whose one formatter prints them.

Modules are imported inside each handler, so that `posleak --help` never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Interrupted(Exception):
    """A command stopped by a signal after saving its state: exit 130 with this message."""


def train(args: argparse.Namespace) -> int:
    from posleak.data import vocab_size_of
    from posleak.train import config as run_config
    from posleak.train.loop import RunInterrupted
    from posleak.train.loop import train as train_run

    cfg, out, resume = _train_target(args)
    if args.print_config:
        model = cfg.model_config(vocab_size_of(cfg.data))  # every model key, as built
        derived = {"ff_width": model.ff_width, "rope_effective_base": model.rope_effective_base}
        print(run_config.to_toml(cfg, model, derived), end="")
        return 0
    try:
        summary = train_run(cfg, out, resume=resume)
    except RunInterrupted as err:
        raise Interrupted(str(err)) from None
    if _rank() == 0:
        print(f"run: {out}")
        loss, steps = summary["final_val_loss"], summary["steps"]
        print(f"final validation loss: {loss:.4f} after {steps} steps")
    return 0


def _train_target(args: argparse.Namespace):
    """The config, the run directory and whether to resume, from train's arguments:
    `CONFIG|PRESET [--out] [--resume]`, or `--resume RUN` with the run's own config."""
    from posleak.model import ConfigError
    from posleak.train import config as run_config
    from posleak.train.loop import RESUMABLE_CHANGES
    from posleak.train.rundir import RunDir

    if isinstance(args.resume, str):  # --resume RUN: the run's own config
        if args.config or args.out:
            raise ConfigError(
                "--resume RUN continues RUN from its own config.toml: give no CONFIG or --out "
                "(or use: posleak train CONFIG --out RUN --resume)"
            )
        run = RunDir(args.resume)
        if not run.config_file.is_file():
            raise ConfigError(f"--resume {run.path}: not a run directory (no config.toml)")
        keys = [run_config.parse_override(o)[0] for o in args.overrides]
        fixed = [k for k in keys if not k.startswith(RESUMABLE_CHANGES)]
        if fixed:
            raise ConfigError(
                f"--set {', '.join(fixed)}: only {', '.join(RESUMABLE_CHANGES)} may change when "
                "a run is resumed; train another config into a new --out"
            )
        run.read_config()  # names a damaged config.toml with the fix
        return run_config.load(run.config_file, args.overrides), run.path, True
    if not args.config:
        raise ConfigError("give a CONFIG file to train, or --resume RUN to continue a run")
    if not Path(args.config).exists() and args.config in run_config.presets():
        # a preset by name: the built-in defaults plus its keys (no config file needed)
        cfg = run_config.load(None, [f"preset={args.config}", *args.overrides])
    else:
        cfg = run_config.load(args.config, args.overrides)
    out = Path(args.out or f"runs/{Path(args.config).stem}-s{cfg.seed}")
    return cfg, out, bool(args.resume)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def init(args: argparse.Namespace) -> int:
    """configs/ as posleak ships it, into a folder: what an installed wheel needs before the
    README's sweeps and studies (a clone has it already). Files already there are kept: an
    identical one is skipped, a different one refuses the whole copy before anything is
    written."""
    from posleak.files import atomic_write, safe_dir

    source = shipped_configs()
    target = Path(args.folder) / "configs"
    files = sorted(p.relative_to(source) for p in source.rglob("*.toml"))
    differ = [str(f) for f in files if (target / f).exists()
              and (target / f).read_bytes() != (source / f).read_bytes()]  # fmt: skip
    if differ:
        raise FileExistsError(
            f"{target} already holds {', '.join(differ)} with other contents; nothing was "
            "written: give another folder, or move those files away"
        )
    written = 0
    for f in files:
        if not (target / f).exists():
            safe_dir((target / f).parent, "configs folder")
            atomic_write(target / f, (source / f).read_bytes())
            written += 1
    print(f"{target}: {written} config files written, {len(files) - written} already there")
    return 0


def shipped_configs() -> Path:
    """configs/ as installed: a wheel's package data (posleak/configs), or the checkout's own
    folder beside posleak/ (an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "base.toml").is_file():
            return candidate
    raise FileNotFoundError("this installation of posleak ships no configs/: reinstall it")


def sweep(args: argparse.Namespace) -> int:
    from posleak.files import owned_dir
    from posleak.log import clock
    from posleak.model import ConfigError
    from posleak.train import sweep as sweeps
    from posleak.train.config import build, parse_override, to_toml

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    spec = sweeps.read_sweep(Path(args.sweep))
    spec["overrides"] = dict(parse_override(text) for text in args.overrides)
    name = spec["name"]
    if spec["overrides"]:  # a smoke sweep: its own folder, never mixed with the full one
        digest = hashlib.sha256(json.dumps(spec["overrides"], sort_keys=True).encode())
        name += f"-set-{digest.hexdigest()[:6]}"
    sweep_dir = Path(args.out or f"runs/sweeps/{name}")
    if args.dry_run:
        print(f"runs into {sweep_dir} (cost: tokens trained, time estimated from a few measured "
              "steps of each shape on this machine, one run at a time):", flush=True)  # fmt: skip
        count, meter, tokens, seconds = 0, sweeps.CostMeter(), 0, 0.0
        for r in sweeps.dry_run(spec, sweep_dir):  # printed as planned: a large grid shows
            grid = " ".join(f"{k}={v}" for k, v in r.grid.items())
            cost = meter.cost(r) if r.status != "done" else None
            what = f"{cost[0]:,} tokens, ~{clock(cost[1])}" if cost else ""
            print(
                f"  {r.name:40s} {r.variant:10s} seed={r.seed} {grid} {r.status} {what} "
                f"{r.error or ''}".rstrip(),
                flush=True,
            )
            count += 1
            tokens, seconds = tokens + (cost[0] if cost else 0), seconds + (cost[1] if cost else 0)
        print(f"{count} runs; to train: {tokens:,} tokens, ~{clock(seconds)}", flush=True)
        return 0
    runs = sweeps.expand(spec, sweep_dir)
    if args.print_config:  # each run's config as it will be resolved: the model as built
        from posleak.data import vocab_size_of

        for r in runs:
            print(f"# {r.name}" + (f"  (invalid: {r.error})" if r.error else ""))
            if r.error is None:
                cfg = build(r.values)
                print(to_toml(cfg, cfg.model_config(vocab_size_of(cfg.data))), flush=True)
        return 0
    owned_dir(sweep_dir, "sweep folder", lambda folder: (folder / "configs").is_dir())
    sweeps.write_plan(sweep_dir, runs, spec.get("study", {}))
    if args.print_commands:
        for r in runs:
            if r.error is None:
                print(shlex.join(sweeps.command(sweep_dir, r)))
        return 0
    if args.launcher:
        from posleak.train import launcher

        parameters = dict(parse_override(text) for text in args.launcher_set)
        jobs = launcher.submit(sweep_dir, runs, args.launcher, parameters)
        print(f"[sweep] {len(jobs)} runs submitted ({args.launcher}; submitit's logs in "
              f"{sweep_dir / 'submitit'}); waiting for them", flush=True)  # fmt: skip
        launcher.gather(sweep_dir, runs, jobs, report=lambda line: print(line, flush=True))
        failed = [r for r in runs if r.status != "done"]
        print(f"[sweep] summary: {sweep_dir / 'summary.md'}")
        return 1 if failed else 0
    started = time.perf_counter()
    if not sweeps.run_sweep(sweep_dir, runs, args.jobs):
        raise Interrupted(
            "the sweep stopped; every running run saved a checkpoint: run the same command "
            "again to continue"
        )
    failed = [r for r in runs if r.status != "done"]
    wall = time.perf_counter() - started
    print(f"[sweep] {len(runs) - len(failed)}/{len(runs)} runs done in {wall:.0f}s")
    for r in failed:
        print(f"[sweep] {r.name}: {r.status}: {r.error}", file=sys.stderr)
    print(f"[sweep] summary: {sweep_dir / 'summary.md'}")
    return 1 if failed else 0


def analyze(args: argparse.Namespace) -> int:
    from posleak.analysis.engine.analyze import analyze as analyze_target
    from posleak.analysis.engine.analyze import default_out
    from posleak.analysis.engine.options import Options

    opts = Options(
        seqs=args.seqs,
        step=args.step,
        seq_len=args.seq_len,
        rope_scale=args.rope_scale,
        data=args.data,
        bos=args.bos,
        device=args.device,
        dtype=args.dtype,
        contrast_window=args.contrast_window,
        ntk_scales=args.ntk_scales,
        stages=args.stages,
        layer_cache_mb=args.layer_cache_mb,
    )
    summary = analyze_target(args.run, opts, args.out)
    out = Path(args.out or default_out(args.run))
    layers = summary["per_layer"]
    interval = layers["probe_r2_log_interval"]
    probe = [
        f"{r2:.2f} [{interval[l][0]:.2f}, {interval[l][1]:.2f}]"
        if r2 is not None and None not in interval.get(l, [None])
        else "nan"
        for l, r2 in layers["probe_r2_log"].items()
    ]
    print(f"analysis: {out} ({summary['seconds']:.1f}s)")
    print(f"probe R^2 (log target) by layer, [95% bootstrap over {opts.seqs} sequences]:")
    print("  " + "  ".join(probe))
    early = f"C_res RMS over queries 1-{opts.early_queries - 1} by layer: "
    print(
        early + " ".join("nan" if v is None else f"{v:.3f}" for v in layers["c_res_early"].values())
    )
    print(f"report: {out / 'report.md'} (figure {out / 'report.png'})")
    return 0


@contextlib.contextmanager
def writing(out: str | Path, ours_already):
    """The report folder, created as posleak's and locked for the whole command: a second
    compare or study into it is refused (naming the first) rather than raced."""
    from posleak.files import owned_dir
    from posleak.train.lock import RunLock

    lock = RunLock(owned_dir(out, "report folder", ours_already))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def compare(args: argparse.Namespace) -> int:
    from posleak.analysis.engine.options import Options
    from posleak.analysis.reports import compare as comparison
    from posleak.files import check_owned

    check_owned(args.out, "report folder", comparison.has_report)  # before any analysis
    runs = comparison.find_runs(args.paths)
    opts = Options(seqs=args.seqs, contrast_window=comparison.contrast_window_of(runs))
    with writing(args.out, comparison.has_report):
        groups, summaries = comparison.load_groups(runs, opts, jobs=args.jobs)
        if not groups:
            raise FileNotFoundError("no finished runs to compare")
        report = comparison.write_report(groups, summaries, Path(args.out), args.reference)
    print(f"report: {report}")
    print(f"html: {report.with_suffix('.html')}")
    return 0


def study(args: argparse.Namespace) -> int:
    from posleak.analysis.reports.compare import has_report
    from posleak.files import check_owned

    check_owned(args.out, "report folder", has_report)  # before any analysis
    with writing(args.out, has_report):
        return _study(args)


def _study(args: argparse.Namespace) -> int:
    from posleak.analysis.reports import light_cone, sink_study, sinks_text, text_study
    from posleak.analysis.reports.study import Study, roles_of

    roles = roles_of(Path(args.sweep), args.report)
    if roles.report == "light-cone":
        cone = light_cone.LightCone(Path(args.sweep), args.seqs, args.jobs, roles)
        print(f"report: {light_cone.write_report(cone, Path(args.out))}")
        return 0
    found = Study(Path(args.sweep), args.seqs, args.jobs, roles)
    writer = {"sinks": sink_study, "sinks-text": sinks_text}.get(roles.report, text_study)
    print(f"report: {writer.write_report(found, Path(args.out))}")
    return 0


def pretrained_study(args: argparse.Namespace) -> int:
    import dataclasses

    from posleak.analysis.engine.options import Options
    from posleak.analysis.reports import pretrained_study as study
    from posleak.files import regular_target

    regular_target(args.out, "--out")  # before the models load
    base, work = Options(seqs=args.seqs, seq_len=args.seq_len), Path(args.work)
    for model in args.models:
        if not model.startswith("hf:"):
            raise ValueError(f"{model!r} is not a pretrained model: give hf:PATH or hf:pypi:NAME")
    models = {model[3:]: study.analyses_of(model, base, work) for model in args.models}
    quantised = None
    if args.quantised:  # analysed at its own training length
        quantised = study.quantised_analyses(
            Path(args.quantised), dataclasses.replace(base, seq_len=None), work
        )
    report = study.write_report(models, quantised, args.quantised, Path(args.out))
    print(f"report: {report}")
    return 0


def export(args: argparse.Namespace) -> int:
    from posleak.train.export import export_gguf, export_hf

    if args.format == "gguf":
        out = export_gguf(args.run, args.out, args.quant)
        print(f"exported: {out} ({args.quant}; analyse with posleak analyze hf:{out})")
        return 0
    out = export_hf(args.run, args.out)
    print(f"exported: {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def sample(args: argparse.Namespace) -> int:
    from posleak.train import sample as sampling
    from posleak.train.rundir import RunDir

    problems = sampling.sample_problems(
        args.tokens, args.top_k, args.temperature, args.seed, args.num_samples
    )
    if problems:
        raise ValueError("; ".join(problems))
    model, cfg, _ = RunDir(args.run).load_model(args.step)
    codec = sampling.Codec(model, cfg)
    prompt = codec.encode(args.prompt)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character
        sys.stdout.reconfigure(errors="backslashreplace")
    for k in range(args.num_samples):
        seed = args.seed + k
        if args.num_samples > 1:
            print(f"--- sample {k + 1} of {args.num_samples} (seed {seed})", flush=True)
        ids = sampling.new_ids(
            model, prompt, args.tokens, args.top_k, args.temperature, seed, cfg.data.seq_len
        )
        print(codec.decode(prompt), end="", flush=True)
        for piece in codec.pieces(ids):
            print(piece, end="", flush=True)
        print()
    return 0


def bench(args: argparse.Namespace) -> int:
    from posleak.files import atomic_write, regular_target
    from posleak.train import bench as benchmark

    regular_target(args.out, "--out")  # before minutes of timing
    if args.passes:
        from posleak.analysis.engine.throughput import pass_throughput, print_passes

        result = pass_throughput(args.passes, args.seqs, args.seq_len, args.rounds)
        print_passes(result)
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")
        return 0
    if args.end_to_end:
        result = end_to_end(args.end_to_end, args.overrides, args.seqs, Path(args.work))
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
        print(f"written: {args.out}")
        return 0
    result = benchmark.run_bench(args.quick)
    cases = [(16, 32, None)] if args.quick else [(256, 128, None), (256, 1024, 8.0)]
    result["analysis"] = analysis_cost(cases, 64 if args.quick else 128)
    benchmark.print_table(result)
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


def end_to_end(configs: list[str], overrides: list[str], seqs: int, work: Path) -> dict:
    """Train each config as a study would on this device (bf16 autocast and torch.compile on a
    GPU, the config's own settings elsewhere), analyse it with every stage, and time both:
    training tokens/s and MFU against the device's measured matmul peak in the precision
    trained, and the analysis's wall time. The runs stay in `work` (a GPU slot is short)."""
    import torch

    from posleak.analysis.engine.analyze import analyze as analyze_run
    from posleak.analysis.engine.options import Options
    from posleak.files import safe_dir
    from posleak.log import log
    from posleak.train import bench as benchmark
    from posleak.train.config import load
    from posleak.train.environment import device_name, flops_per_token, resolve_device
    from posleak.train.loop import train as train_run
    from posleak.train.rundir import RunDir

    device = resolve_device("auto")
    gpu = device.type == "cuda"
    runs = []
    for path in configs:  # every config validated before any training
        cfg = load(path, [*(["train.precision=bf16", "train.compile=true"] if gpu else []),
                          *overrides])  # fmt: skip
        runs.append((Path(path).stem, cfg))
    safe_dir(work, "--work folder")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    rows = []
    for name, cfg in runs:
        out = work / name
        log.info(f"[end-to-end] training {name} into {out}")
        train_run(cfg, out, resume=True)
        run = RunDir(out)
        done, (model, _, _) = run.summary(), run.load_model()
        precision = done.get("precision", cfg.train.precision)
        peak = benchmark.matmul_peak(dtypes.get(precision, torch.float32), device, 2048, 3)
        tokens_per_s = done["tokens"] / done["elapsed_s"]
        log.info(f"[end-to-end] analysing {name} at {seqs} sequences")
        started = time.perf_counter()
        analyze_run(out, Options(seqs=seqs))
        rows.append(
            {
                "config": name,
                "precision": precision,
                "compile": cfg.train.compile,
                "steps": done["steps"],
                "tokens_per_s": tokens_per_s,
                "mfu": flops_per_token(model, cfg.data.seq_len) * tokens_per_s / peak,
                "matmul_peak_flops": peak,
                "train_s": done["elapsed_s"],
                "analysis_seqs": seqs,
                "analysis_s": time.perf_counter() - started,
            }
        )
    return {"device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "runs": rows}  # fmt: skip


def analysis_cost(cases: list[tuple[int, int, float | None]], d: int) -> list[dict]:
    """Wall time and peak RSS of `posleak analyze` on a 4-layer model (untrained: the speed is
    the same), one child process per (seqs, seq_len, rope_scale) case."""
    from posleak.train.config import build
    from posleak.train.loop import train as train_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides = {"model.d_model": d, "train.steps": 1, "train.warmup": 0}
        overrides |= {"train.eval_batches": 1, "train.precision": "fp32", "log.progress": False}
        train_run(build(overrides), run_dir)
        for seqs, seq_len, scale in cases:
            out = Path(tmp) / f"an-{seq_len}"
            args = ["--seqs", seqs, "--seq-len", seq_len, "--out", out]
            args += ["--rope-scale", scale] if scale else []
            seconds, status, peak_mb = _child_cost(["analyze", run_dir, *args])
            rows.append(
                {
                    "seqs": seqs,
                    "seq_len": seq_len,
                    "rope_scale": scale,
                    "d_model": d,
                    "seconds": seconds,
                    "exit": status,
                    "peak_rss_mb": peak_mb,
                }
            )
    return rows


# The child reports its own high-water mark: ru_maxrss would keep the benchmark's (the forked
# parent's) pages from before exec, which made every analysis look as large as the benchmark.
_CHILD = """import sys
from posleak.cli import main
code = main(sys.argv[1:])
try:
    peak = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))
except (OSError, StopIteration):
    peak = -1
print("peak_kb", peak)
sys.exit(code)
"""


def _child_cost(args: list) -> tuple[float, int, float | None]:
    """Wall seconds, exit status and peak RSS (MB; None off Linux) of `posleak ARGS...`."""
    started = time.perf_counter()
    cmd = [sys.executable, "-c", _CHILD, *map(str, args)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    kb = int(done.stdout.split()[-1]) if "peak_kb" in done.stdout else -1
    return seconds, done.returncode, kb / 1024 if kb > 0 else None
