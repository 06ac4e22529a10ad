"""Analysis throughput by kind of pass (`posleak bench --passes TARGET`).

An analysis is some sixty passes over its sequences; what one costs decides what a study
costs. Four kinds, timed round-robin so that machine noise hits them alike: the forward pass
alone, the forward with every position's loss, the base pass with every statistic (logit
block sums, probe moments, the key-0 column), and an intervention pass (the key-0 knockout in
every layer) scored the way the stages score theirs, against the fitted probes. The
decomposition's fits of the logit sums, which every pass with statistics ends with, are timed
apart. A pretrained model is measured with float32 and with bfloat16 weights side by side.
"""

from __future__ import annotations

import statistics
import time

import torch

from posleak.analysis.engine.analyze import Analysis, subject_of
from posleak.analysis.engine.collect import stream
from posleak.analysis.engine.options import Options
from posleak.analysis.maths import measures
from posleak.analysis.maths.logits import logit_stats
from posleak.log import clock, log

KINDS = ("forward", "loss", "base pass", "intervention", "logit fits")


class Case:
    """One target in one weight dtype, loaded once, its tokens drawn once."""

    def __init__(self, target: str, dtype: str, seqs: int, seq_len: int | None):
        opts = Options(seqs=seqs, seq_len=seq_len, dtype=dtype)
        self.label = dtype
        self.analysis = Analysis(subject_of(target, opts), opts)
        a = self.analysis
        tokens = a.tokens(seqs, a.T, "analysis")
        self.inputs, self.targets = tokens[:, : a.T], tokens[:, 1 : a.T + 1]
        self.fitted = None
        self.times: dict[str, list[float]] = {kind: [] for kind in KINDS}

    def run(self, kind: str) -> None:
        a, started = self.analysis, time.perf_counter()
        if kind == "forward":
            stream(a.model, self.inputs, {}, a.batch)
        elif kind == "loss":
            stream(a.model, self.inputs, {}, a.batch, [], self.targets)
        elif kind == "base pass":
            done = a.measure(self.inputs, targets=self.targets)
            self.fitted = [{"log": d.fit("log")} for d in done.probe_data]
            self.sums = done.sums
        elif kind == "intervention":
            knock = [(f"blocks.{l}.attn.pattern", lambda p, name: measures.knock_out_key0(p))
                     for l in range(a.L)]  # fmt: skip
            a.measure(self.inputs, knock, fitted=self.fitted, targets=self.targets)
        else:  # the fits every pass with statistics ends with
            for l, sums in enumerate(self.sums):
                logit_stats(sums, a.design(l), a.boot_a, a.boot_b)
        self.times[kind].append(time.perf_counter() - started)

    def rows(self) -> list[dict]:
        tokens = self.inputs.numel()
        return [
            {
                "dtype": self.label,
                "pass": kind,
                "seconds": statistics.median(times),
                "tokens_per_s": tokens / statistics.median(times),
                "repeats": len(times),
            }
            for kind, times in self.times.items()
        ]


def pass_throughput(target: str, seqs: int, seq_len: int | None, rounds: int) -> dict:
    """Median seconds and tokens/s of each kind of pass, over `rounds` round-robin rounds
    (after one untimed warm-up round), for float32 and, for a pretrained model, bfloat16."""
    dtypes = ("float32", "bfloat16") if str(target).startswith("hf:") else ("float32",)
    cases = [Case(target, dtype, seqs, seq_len) for dtype in dtypes]
    total, started, done = (rounds + 1) * len(cases) * len(KINDS), time.perf_counter(), 0

    def timed(case: Case, kind: str, stage: str) -> None:
        nonlocal done
        case.run(kind)
        done += 1
        took = time.perf_counter() - started
        log.info(
            f"[bench] passes: {stage}, {case.label} {kind} | {done}/{total} passes | elapsed "
            f"{clock(took)} | eta {clock(took / done * (total - done))}"
        )

    for case in cases:  # warm-up; the base pass also fits the probes the intervention uses
        for kind in KINDS:
            timed(case, kind, "warm-up")
            case.times[kind].clear()
    for r in range(rounds):
        for kind in KINDS:
            for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
                timed(case, kind, f"round {r + 1}/{rounds}")
    a = cases[0].analysis
    return {
        "target": str(target),
        "seqs": seqs,
        "seq_len": a.T,
        "layers": a.L,
        "heads": a.H,
        "threads": torch.get_num_threads(),
        "passes": [row for case in cases for row in case.rows()],
    }


def print_passes(result: dict) -> None:
    print(
        f"{result['target']}: {result['seqs']} x {result['seq_len']} tokens, "
        f"{result['layers']} layers x {result['heads']} heads, {result['threads']} threads"
    )
    print("{:10s} {:14s} {:>9s} {:>10s}".format("dtype", "pass", "seconds", "tokens/s"))
    rows = result["passes"]
    for r in rows:
        print(f"{r['dtype']:10s} {r['pass']:14s} {r['seconds']:9.2f} {r['tokens_per_s']:10.0f}")
    by = {(r["dtype"], r["pass"]): r["seconds"] for r in rows}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        stats = by[dtype, "base pass"] / by[dtype, "forward"]
        print(f"{dtype}: base pass / forward {stats:.2f}x, of which the logit fits "
              f"{by[dtype, 'logit fits'] / by[dtype, 'base pass']:.0%}")  # fmt: skip
    if ("bfloat16", "forward") in by:
        ratios = ", ".join(f"{k} {by['float32', k] / by['bfloat16', k]:.2f}x" for k in KINDS)
        print(f"bfloat16 speed-up over float32: {ratios}")
