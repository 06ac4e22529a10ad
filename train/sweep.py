"""Sweeps (`posleak sweep SWEEP.toml [--jobs N] [--dry-run] [--print-commands] [--out DIR]`)

A sweep file names a base config, named variants (overlays of keys), seeds, and optionally
a grid over any other keys:

    base = "../base.toml"          # relative to the sweep file
    seeds = [0, 1, 2]
    [variants.rope]
    preset = "rope"                 # a variant of train/presets.toml ...
    [variants.swa64]
    preset = "swa"
    model.window = 64               # ... with keys of its own on top
    [variants.nope]
    model.position = "nope"         # or keys alone
    [variants.markov]
    data.source = "markov"
    seeds = [0]                     # optional: this variant's own seeds
    [grid]                          # optional: every combination is crossed with variants
    train.lr = [1e-3, 3e-3]
    [set]                           # optional: overrides for every run
    train.steps = 300
    [study]                         # optional: the variants' roles in `posleak study`
    report = "text"                 # which report (text, sinks, light-cone)
    reference = "rope"              # a role names a variant, a list of them, or pairs

Each run gets a readable, deterministic name (variant, grid values, seed and a short hash
of its keys as written) and its own directory under the sweep directory; a run already trained
there under another spelling keeps its folder (TrainedRuns). Every run is an
independent command (`--print-commands`), so any scheduler can execute the sweep.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from posleak.files import atomic_write
from posleak.log import clock, log
from posleak.model import ConfigError
from posleak.report import table
from posleak.train.config import (
    MAX_SEED,
    RunConfig,
    TrainConfig,
    build,
    flatten,
    from_resolved,
    preset,
    presets,
    read_toml,
    read_toml_file,
)
from posleak.train.lock import holder
from posleak.train.loop import PARENT_ENV
from posleak.train.rundir import RunDir, RunDirError

SWEEP_KEYS = {"name", "base", "seeds", "variants", "grid", "set", "study"}
STUDY_FILE = "study.json"  # the sweep's [study] table, in the sweep folder
PROGRESS_EVERY_S = 30.0  # a progress line between runs' "done" lines
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class PlannedRun:
    name: str
    variant: str
    seed: int
    grid: dict
    values: dict  # flat dotted config values
    error: str | None = None  # set when the config does not validate
    status: str = "pending"
    result: dict = field(default_factory=dict)


def read_sweep(path: Path) -> dict:
    path = Path(path)
    spec = read_toml_file(path, "sweep file")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown sweep keys {sorted(unknown)}; valid keys: {sorted(SWEEP_KEYS)}")
    for key in ("base", "seeds", "variants"):
        if key not in spec:
            raise ConfigError(f"sweep file {path} needs `{key}` (see `posleak sweep --help`)")
    problems = spec_problems(spec)
    if problems:
        raise ConfigError(f"sweep file {path}:\n  - " + "\n  - ".join(problems))
    spec.setdefault("name", path.stem)
    spec["base"] = str((path.parent / spec["base"]).resolve())
    return spec


def spec_problems(spec: dict) -> list[str]:
    """Shapes a sweep file must have; names must be safe as directory names."""
    out = []
    if not _seed_list(spec["seeds"]):
        out.append(
            f"seeds must be a non-empty list of integers in [0, 2^63), e.g. [0, 1, 2]; "
            f"got {spec['seeds']!r}"
        )
    variants = spec["variants"]
    if not (isinstance(variants, dict) and variants):
        out.append("variants must be tables: [variants.NAME] followed by its keys")
    else:
        out += [f"variant name {name!r} {why}" for name in variants if (why := _unsafe(name))]
        for name, overlay in variants.items():
            own = overlay.get("seeds", [0]) if isinstance(overlay, dict) else None
            if not _seed_list(own):
                out.append(
                    f"variants.{name} must be a table whose seeds, if given, are integers in "
                    "[0, 2^63)"
                )
            elif "preset" in overlay and (
                not isinstance(overlay["preset"], str) or overlay["preset"] not in presets()
            ):
                out.append(
                    f"variants.{name}: unknown preset {overlay['preset']!r}; "
                    f"valid presets: {sorted(presets())}"
                )
    for key in ("grid", "set"):
        if not isinstance(spec.get(key, {}), dict):
            out.append(f"{key} must be a table ([{key}] followed by keys), got {spec[key]!r}")
    grid = spec.get("grid", {})
    for key, values in flatten(grid if isinstance(grid, dict) else {}).items():
        if key == "seed":
            out.append("grid.seed: seeds are not a grid key; list them in `seeds = [...]`")
        elif not (isinstance(values, list) and values):
            out.append(f"grid.{key} must be a non-empty list of values, got {values!r}")
    if not isinstance(spec.get("base"), str):
        out.append(f"base must be the path of a config file, got {spec.get('base')!r}")
    if "name" in spec and (why := _unsafe(spec["name"])):
        out.append(f"sweep name {spec['name']!r} {why}")
    if isinstance(variants, dict):
        out += study_problems(spec.get("study", {}), set(variants))
    return out


def study_problems(study, variants: set[str]) -> list[str]:
    """The [study] table: `report` a string, `data` the source every analysis reads (instead
    of each run's own), every other key a role naming variants of this sweep (one, a list, or
    a list of pairs): a misspelt role fails here, not in the report."""
    if not isinstance(study, dict):
        return [f"study must be a table ([study] followed by roles), got {study!r}"]
    out = []
    for role, value in study.items():
        if role in ("report", "data"):
            if not isinstance(value, str) or not value.strip():
                what = "a report's name" if role == "report" else "a data source (e.g. bible)"
                out.append(f"study.{role} must be {what}, got {value!r}")
            continue
        names = value if isinstance(value, list) else [value]
        names = [n for item in names for n in (item if isinstance(item, list) else [item])]
        unknown = [n for n in names if n not in variants]
        if not names or unknown:
            out.append(
                f"study.{role} must name variants of this sweep, got {value!r}; "
                f"variants: {sorted(variants)}"
            )
    return out


def _seed_list(seeds) -> bool:
    return (
        isinstance(seeds, list)
        and bool(seeds)
        and all(type(x) is int and 0 <= x < MAX_SEED for x in seeds)
    )


def _unsafe(name) -> str | None:
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        return "must use only letters, digits, '.', '_' and '-' (it names a directory)"
    return None


def _label(value) -> str:
    """A grid value as part of a run name: unsafe characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(value))[-40:]


def expand(spec: dict, sweep_dir: Path | None = None) -> list[PlannedRun]:
    """Every (grid point, variant, seed) as a run; invalid configs are kept, marked with why.
    Given the sweep's folder, a run trained there under another name takes that name back
    (`trained_as`)."""
    return list(planned(spec, sweep_dir))


def planned(spec: dict, sweep_dir: Path | None = None) -> Iterator[PlannedRun]:
    """expand() one run at a time."""
    trained = TrainedRuns(sweep_dir)
    base = read_toml(Path(spec["base"]))
    shared = flatten(spec.get("set", {}))
    overrides = spec.get("overrides", {})  # `posleak sweep FILE --set k=v`: every run, last
    grid = flatten(spec.get("grid", {}))
    grid_keys = sorted(grid)
    for point in itertools.product(*(grid[k] for k in grid_keys)):
        grid_values = dict(zip(grid_keys, point, strict=True))
        for variant, overlay in spec["variants"].items():
            keys = {k: v for k, v in overlay.items() if k not in ("seeds", "preset")}
            keys = {**(preset(overlay["preset"]) if "preset" in overlay else {}), **flatten(keys)}
            for seed in overlay.get("seeds", spec["seeds"]):
                values = {**base, **shared, **keys, **grid_values, **overrides, "seed": seed}
                digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
                label = "".join(
                    f"-{k.rsplit('.', 1)[-1]}{_label(v)}" for k, v in grid_values.items()
                )
                run = PlannedRun(
                    f"{variant}{label}-s{seed}-{digest[:8]}", variant, seed, grid_values, values
                )
                try:
                    run.name = trained.name_of(run, build(values))
                except ConfigError as err:
                    run.error, run.status = str(err), "invalid"
                yield run


class TrainedRuns:
    """The runs already in a sweep folder, by (variant, seed). A run's name hashes its keys as
    written, so a config spelled anew (a preset written out as keys, a renamed key read by
    the one-version reader) names the same run differently: name_of finds the folder that
    already holds it, by comparing resolved configs, so that nothing is trained twice."""

    def __init__(self, sweep_dir: Path | None):
        self.sweep_dir, self.by_label = sweep_dir, None

    def name_of(self, run: PlannedRun, cfg: RunConfig) -> str:
        """run.name, or the name of the folder that holds the same run under another name."""
        if self.sweep_dir is None or (self.sweep_dir / run.name).exists():
            return run.name
        for folder in self._folders().get((run.variant, run.seed), []):
            if _same_run(cfg, folder):
                return folder.name
        return run.name

    def _folders(self) -> dict:
        if self.by_label is None:
            self.by_label = {}
            for folder in sorted(self.sweep_dir.glob("*/config.toml")):
                try:
                    label = RunDir(folder.parent).sweep_label()
                except (ValueError, OSError):
                    continue
                if label:
                    key = (label.get("variant"), label.get("seed"))
                    self.by_label.setdefault(key, []).append(folder.parent)
        return self.by_label


def _same_run(cfg: RunConfig, folder: Path) -> bool:
    """Whether the run in `folder` (its resolved config.toml) trains exactly what cfg does:
    seed, data, training and the model as built (the vocabulary as that run resolved it)."""
    try:
        done = from_resolved(folder / "config.toml")
        vocab = done.model.get("vocab_size") or 0
        same = (cfg.seed, cfg.data.built(), cfg.train) == (done.seed, done.data.built(), done.train)
        return same and (cfg.model_config(vocab) == done.model_config(vocab))
    except (ConfigError, ValueError, OSError):
        return False


def write_plan(sweep_dir: Path, runs: list[PlannedRun], study: dict) -> None:
    """One config file per run under sweep_dir/configs/ (what each command trains), a
    sweep.json label in each run directory (its variant name, for the analysis) and the
    sweep's [study] table as study.json (the variants' roles, for `posleak study`)."""
    configs = sweep_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep_dir / STUDY_FILE, json.dumps(study, sort_keys=True) + "\n")
    for run in runs:
        nested: dict = {}
        for key, value in run.values.items():
            section, _, name = key.rpartition(".")
            (nested.setdefault(section, {}) if section else nested)[name or key] = value
        path = configs / f"{run.name}.toml"
        text = tomli_w.dumps(nested)
        if not path.exists() or path.read_text() != text:
            atomic_write(path, text)
        label = {"variant": run.variant, "seed": run.seed, "grid": run.grid}
        (sweep_dir / run.name).mkdir(exist_ok=True)
        RunDir(sweep_dir / run.name).write("sweep.json", json.dumps(label) + "\n")


def read_study(sweep_dir: Path) -> dict | None:
    """The [study] table a sweep folder was planned with ({} when the sweep file had none;
    None for a folder planned before sweeps recorded it)."""
    path = Path(sweep_dir) / STUDY_FILE
    if not path.exists():
        return None
    try:
        study = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path} is damaged ({err}): run the sweep command again") from None
    if not isinstance(study, dict):
        raise RunDirError(f"{path} is not a table: run the sweep command again")
    return study


def command(sweep_dir: Path, run: PlannedRun) -> list[str]:
    config = sweep_dir / "configs" / f"{run.name}.toml"
    return ["posleak", "train", str(config), "--out", str(sweep_dir / run.name), "--resume"]


class Executor:
    """Runs the planned runs as subprocesses, `jobs` at a time, each with capped threads."""

    def __init__(self, sweep_dir: Path, runs: list[PlannedRun], jobs: int):
        self.sweep_dir, self.runs, self.jobs = sweep_dir, runs, jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def run_one(self, run: PlannedRun) -> None:
        out = self.sweep_dir / run.name
        if RunDir(out).summary_file.exists():
            run.status = "done"
            return
        if self.stopping:
            return
        owner = holder(out)
        if owner is not None:  # another sweep (or a train) has it: not a failure of this run
            run.status = "held"
            run.error = (
                f"in use by pid {owner['pid']} on {owner['host']} (another sweep or train): "
                "left to it; run this sweep again once it is done"
            )
            return
        out.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            PARENT_ENV: str(os.getpid()),  # the child stops (checkpointed) if the sweep dies
        }
        cmd = [sys.executable, "-m", "posleak", *command(self.sweep_dir, run)[1:]]
        run.status = "running"
        with RunDir(out).append("train.log") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.children[run.name] = proc
            code = proc.wait()
            with self.lock:
                del self.children[run.name]
        if code == 0:
            run.status = "done"
        elif code == 130 or self.stopping:
            run.status = "interrupted"
        else:
            run.status = "failed"
            run.error = _error_line(RunDir(out).log_file)

    def execute(self) -> None:
        # seed by seed: a sweep stopped early leaves every variant at the same seeds
        todo = sorted((r for r in self.runs if r.error is None), key=lambda r: r.seed)
        started = last_report = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            pending = {pool.submit(self.run_one, r): r for r in todo}
            try:
                while pending:
                    done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for fut in done:
                        run = pending.pop(fut)
                        fut.result()
                        log.info(f"[sweep] {run.name}: {run.status}")
                        write_summary(self.sweep_dir, self.runs)
                    if time.perf_counter() - last_report >= PROGRESS_EVERY_S and pending:
                        last_report = time.perf_counter()
                        log.info(self.progress(todo, last_report - started))
            except KeyboardInterrupt:
                self.stopping = True
                with self.lock:
                    for proc in self.children.values():
                        proc.send_signal(signal.SIGINT)  # children checkpoint, then exit
                for fut in pending:
                    fut.cancel()
                raise

    def progress(self, todo: list[PlannedRun], elapsed: float) -> str:
        return progress_line(self.sweep_dir, todo, elapsed)


def progress_line(sweep_dir: Path, todo: list[PlannedRun], elapsed: float) -> str:
    """One line: runs done, each running run's step, elapsed time and an ETA from the steps
    done so far."""
    total = done = 0
    running = []
    for run in todo:
        steps = run.values.get("train.steps", TrainConfig.steps)
        total += steps
        if run.status == "done":
            done += steps
        elif run.status == "running":
            step = _last_step(sweep_dir / run.name)
            done += step
            running.append(f"{run.name} {step}/{steps}")
    finished = sum(r.status == "done" for r in todo)
    eta = elapsed * (total - done) / done if done else float("nan")
    return (
        f"[sweep] {finished}/{len(todo)} done | running: {', '.join(running) or '-'} | "
        f"elapsed {clock(elapsed)} | eta {clock(eta)}"
    )


def _last_step(run_dir: Path) -> int:
    """The step of the last complete metrics line (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _error_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("error:", "Traceback")) or "Error" in line:
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def collect(sweep_dir: Path, runs: list[PlannedRun]) -> None:
    for run in runs:
        try:
            summary = RunDir(sweep_dir / run.name).summary()
        except RunDirError as err:  # one damaged run never stops the others
            run.status, run.error = "failed", str(err)
            continue
        if summary is not None:
            run.result = summary
            run.status = "done"


def write_summary(sweep_dir: Path, runs: list[PlannedRun]) -> None:
    collect(sweep_dir, runs)
    header = ["run", "variant", "seed", *sorted({k for r in runs for k in r.grid})]
    header += ["status", "steps", "final_val_loss", "wall_s", "error"]
    rows = []
    for r in runs:
        res = r.result
        row = {"run": r.name, "variant": r.variant, "seed": r.seed, **r.grid, "status": r.status}
        row["steps"] = res.get("steps", "")
        row["final_val_loss"] = f"{res['final_val_loss']:.4f}" if "final_val_loss" in res else ""
        row["wall_s"] = f"{res['elapsed_s']:.1f}" if "elapsed_s" in res else ""
        row["error"] = (r.error or "").replace("\n", " ")[:300]
        rows.append(row)
    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep_dir / "summary.csv", csv_text.getvalue())
    lines = table(header, [[row.get(h, "") for h in header] for row in rows])
    atomic_write(sweep_dir / "summary.md", "\n".join(lines) + "\n")


def dry_run(spec: dict, sweep_dir: Path) -> Iterator[PlannedRun]:
    """The expansion run by run, as it is planned, each with the status it has on disk."""
    for r in planned(spec, sweep_dir):
        collect(sweep_dir, [r])
        yield r


def _terminate(signum, frame):
    """SIGINT and SIGTERM stop a sweep: children are told to checkpoint and waited for."""
    raise KeyboardInterrupt


def run_sweep(sweep_dir: Path, runs: list[PlannedRun], jobs: int) -> bool:
    """Train every valid planned run, `jobs` at a time, and write the summary; False when
    SIGINT or SIGTERM stopped it (every child checkpointed; the same call continues). Both
    handlers are installed explicitly: a sweep started in the background of a script inherits
    SIGINT ignored, and would otherwise run on through Ctrl-C."""
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _terminate) for sig in stops}
    try:
        Executor(sweep_dir, runs, jobs).execute()
    except KeyboardInterrupt:
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        write_summary(sweep_dir, runs)
    return True


class CostMeter:
    """A run's training tokens and its estimated time on this machine: one short measurement
    per distinct shape (model, batch, length, precision, device: a warm-up step, then
    TIMED_STEPS steps of the run's own model at random tokens), times the run's steps."""

    TIMED_STEPS = 3

    def __init__(self):
        self.seconds_per_step: dict[str, float] = {}

    def cost(self, run: PlannedRun) -> tuple[int, float] | None:
        """(tokens, seconds) of a valid run, None for one that does not validate."""
        if run.error is not None:
            return None
        from posleak.data import vocab_size_of
        from posleak.train.bench import TrainCase
        from posleak.train.environment import resolve_device, resolve_precision

        cfg = build(run.values)
        t, T = cfg.train, cfg.data.seq_len
        model_cfg = cfg.model_config(vocab_size_of(cfg.data))
        device = resolve_device(t.device)
        precision, _ = resolve_precision(t.precision, device, model_cfg.d_model)
        key = json.dumps([model_cfg.to_dict(), t.batch_size, T, precision, str(device)])
        if key not in self.seconds_per_step:
            case = TrainCase(run.name, model_cfg, t.batch_size, T, precision, device)
            case.step()  # warm-up: allocation and first-call costs
            times = sorted(case.step() for _ in range(self.TIMED_STEPS))
            self.seconds_per_step[key] = times[len(times) // 2]
        return t.steps * t.batch_size * T, t.steps * self.seconds_per_step[key]
