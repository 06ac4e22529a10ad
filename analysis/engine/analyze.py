"""`posleak analyze RUN|hf:MODEL [--seqs N] [--step S] [--seq-len L] [--rope-scale S] [--data SRC]
[--bos always|never] [--device D] [--dtype T] [--out D]`

The engine: one base pass over held-out sequences (logit sums, the probes' half-A statistics,
the key-0 column), then every registered measurement of analysis/stages/ in order. It writes
records.jsonl (tidy rows), analysis.json (headline numbers and options), report.png and
report.md into RUN/analysis (or --out; a pretrained model's default is analyses/NAME).
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import NamedTuple

import torch

from posleak.analysis import stages
from posleak.analysis.engine.collect import LogitSums, Subject, each, run_subject, store, stream
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.options import Options
from posleak.analysis.engine.progress import Progress
from posleak.analysis.engine.records import Recorder
from posleak.analysis.engine.summary import run_report, summarise
from posleak.analysis.maths import measures
from posleak.analysis.maths import probe as probes
from posleak.analysis.maths.logits import LogitStats, logit_stats
from posleak.analysis.maths.stats import bootstrap_weights
from posleak.analysis.reports import plots
from posleak.model.masks import attention_mask
from posleak.train.environment import check_fits


class Pass(NamedTuple):
    """What one forward pass over the analysis sequences leaves behind."""

    logits: list[LogitStats]  # per attention layer
    probe_data: list[probes.ProbeData]  # per residual site, half A (base pass only)
    first_column: list[torch.Tensor]  # per attention layer: A_i0, (N, H, T) (base pass only)
    probe_r2_log: list[float] | None  # transfer R^2: the base probes on half B (interventions)
    probe_refit_r2_log: list[float] | None  # a probe refit on the intervened half A, scored
    # on the intervened half B: the position information left (interventions only)
    sums: list[LogitSums]  # per attention layer: the block sums the stats came from
    losses: torch.Tensor | None  # (N, T) next-token loss of every position, when asked for


class Analysis:
    def __init__(self, subject: Subject, opts: Options):
        self.subject, self.opts = subject, opts
        self.model = subject.model
        problems = opts.problems(subject.train_len)
        if problems:
            raise ValueError("; ".join(problems))
        self.set_rope_scale(opts.rope_scale or 1.0)
        self.T = subject.train_len if opts.seq_len is None else opts.seq_len
        self.bos = opts.bos or subject.bos
        self.L, self.H = self.model.cfg.n_layer, self.model.cfg.n_head
        # per layer: a hybrid model (Gemma 3) has window and global layers
        self.windows = tuple(
            getattr(self.model.cfg, "windows", None) or (self.model.cfg.window,) * self.L
        )
        self.window = min((w for w in self.windows if w), default=None)  # the smallest
        widest = None if None in self.windows else max(self.windows)
        check_fits(
            analysis_bytes(opts, self.L, self.H, self.T, widest, self.model.cfg.d_model),
            f"analysing {opts.seqs} sequences of {self.T} tokens",
            "lower --seqs or --seq-len",
        )
        self._designs = {
            w: measures.two_way_design(attention_mask(self.T, w)) for w in set(self.windows)
        }
        self.label = subject.label
        self.rec = Recorder(stages.sites(), run=subject.name, **self.label)
        self.resid_names = ["blocks.0.resid_pre"] + [
            f"blocks.{l}.resid_post" for l in range(self.L)
        ]
        self.positions = torch.arange(opts.probe_min_pos, self.T)
        self.n_blocks = min(opts.blocks, opts.seqs - opts.seqs % 2)
        half = self.n_blocks // 2
        self.boot_a = bootstrap_weights(half, opts.bootstrap, seed=1)
        self.boot_b = bootstrap_weights(half, opts.bootstrap, seed=2)
        self.batch = max(
            1, min(opts.batch_size, opts.max_attention_elements // (self.H * self.T**2))
        )
        self.timings: dict[str, float] = {}  # seconds per stage of run_all
        # every block's input over the analysed sequences, kept by the base pass where the
        # model can start a pass at a block and they fit in --layer-cache-mb
        d = self.model.cfg.d_model
        fits = self.L * opts.seqs * self.T * d * 4 <= opts.layer_cache_mb * 2**20
        self.keeps_inputs = hasattr(self.model, "hidden_from") and fits
        self.layer_inputs: list[torch.Tensor] = []
        self._kept_for: tuple = ()  # (the tokens, the RoPE scale) the kept inputs are of
        self._unchanged: dict = {}  # (site, probes) -> (transfer R², refit R²) unchanged
        self._base: Pass | None = None

    def tokens(self, n: int, seq_len: int, stream_name: str, bos: str | None = None):
        """(n, seq_len + 1) held-out tokens; the model reads [:, :seq_len]."""
        return self.subject.draw(n, seq_len, bos or self.bos, stream_name)

    def run_all(self) -> tuple[list[dict], dict]:
        """The base pass, then every registered stage in order (analysis/stages/)."""
        started = time.perf_counter()
        self.rec.add("val_loss", self.subject.info.get("val_loss"))  # the run's, from training
        enabled = stages.chosen(self.opts)
        plan = {"base pass": self.opts.seqs * self.T, **{s.name: s.work(self) for s in enabled}}
        progress = Progress(plan)
        self.progress = progress
        counter = self.model.embed_tokens.register_forward_pre_hook(  # every pass embeds
            lambda module, args: progress.forwarded(args[0].numel() if args else 0)
        )
        try:
            tokens = self.tokens(self.opts.seqs, self.T, "analysis")  # with next-token targets
            progress.stage("base pass")  # after the draw: bad input fails before any line
            ctx = self.context(tokens)
            for stage in enabled:
                progress.stage(stage.name)
                with self._timed(stage.name):
                    stage.run(self, ctx)
        finally:
            counter.remove()
            progress.close()
        return self.rec.rows, self.summary(time.perf_counter() - started)

    def context(self, tokens: torch.Tensor) -> stages.Context:
        """The shared base pass over the analysed tokens (N, T + 1: the model reads the first
        T, the last T are its targets), for the stages to read."""
        inputs, targets = tokens[:, : self.T], tokens[:, 1 : self.T + 1]
        with self._timed("base pass"):
            self._base = self.measure(inputs, targets=targets, keep_inputs=self.keeps_inputs)
            return stages.Context(inputs, self._base, targets)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        started = time.perf_counter()
        yield
        self.timings[stage] = round(time.perf_counter() - started, 2)

    # ---------------------------------------------------------------- one pass
    def measure(
        self, tokens: torch.Tensor, interventions=(), fitted=None, targets=None, keep_inputs=False
    ) -> Pass:
        """Logit sums, the probes' half-A sums and the key-0 column, accumulated batch by batch.

        Given the base pass's fitted probes (an intervention pass), the residual stream is
        scored on half B as it streams past instead. Given targets, the same pass gives the
        loss of every position (no second pass for the loss change of an intervention).
        An intervention on the base pass's tokens whose hooks all sit in blocks >= f starts
        at block f from the inputs the base pass kept (`keep_inputs`): the layers and sites
        before it are the base pass's, unchanged, so the numbers are those of a whole pass."""
        start = self._first_changed(tokens, interventions) if fitted is not None else 0
        sums = [LogitSums(self.n_blocks, self.H, self.design(l).visible) for l in range(self.L)]
        consumers = {f"blocks.{l}.attn.scores": sums[l].add for l in range(start, self.L)}
        data, first, scorers = [], [], []
        if fitted is None:
            d = self.model.cfg.d_model
            data = [self._probe_data(d) for _ in self.resid_names]
            first = [torch.empty(len(tokens), self.H, self.T) for _ in range(self.L)]
            for l in range(self.L):
                consumers[f"blocks.{l}.attn.pattern"] = store(first[l], lambda p: p[..., 0])
            for site, name in enumerate(self.resid_names):
                consumers[name] = self._probe_collector(data[site])
            if keep_inputs:
                self._keep_inputs(tokens, consumers)
        else:
            n_b = len(self.halves(len(tokens))[1])
            scorers = [probes.Scorer(p["log"], self.positions, n_b) for p in fitted]
            d = self.model.cfg.d_model
            data = [self._probe_data(d) for _ in self.resid_names]  # half A, for the refit
            held = [probes.ProbeData(d, 1) for _ in self.resid_names]  # half B's moments
            for site, name in enumerate(self.resid_names):
                consumers[name] = self._scoring(scorers[site], data[site], held[site])
        kept = (start, self.layer_inputs[start]) if start else None
        losses = stream(
            self.model, tokens, consumers, self.batch, list(interventions), targets, kept
        )
        if start and hasattr(self, "progress"):  # the tokens the embedding hook did not see
            self.progress.forwarded(tokens.numel())
        stats = [
            self._base.logits[l]
            if l < start
            else logit_stats(s, self.design(l), self.boot_a, self.boot_b)
            for l, s in enumerate(sums)
        ]
        sums[:start] = self._base.sums[:start] if start else []
        if fitted is None:
            return Pass(stats, data, first, None, None, sums, losses)
        r2, refit = [], []
        for site, (scorer, a, b) in enumerate(zip(scorers, data, held, strict=True)):
            if site <= start and start:  # sites 0..start hold the base pass's states
                unchanged = self._unchanged_site(site, fitted)
            else:
                unchanged = scorer.result().r2, probes.r2_of_moments(a.fit("log"), b)
            r2.append(unchanged[0])
            refit.append(unchanged[1])
        return Pass(stats, [], first, r2, refit, sums, losses)

    def _keep_inputs(self, tokens: torch.Tensor, consumers: dict) -> None:
        """Consumers that keep every block's input (N, T, d) over `tokens` (block 0's joins
        the probe's collector of the same site)."""
        d = self.model.cfg.d_model
        self.layer_inputs = [torch.empty(len(tokens), self.T, d) for _ in range(self.L)]
        self._kept_for = (tokens, self.model.rope_inference_scale)
        self._unchanged = {}
        for l in range(self.L):
            keep = store(self.layer_inputs[l], lambda x: x)
            name = f"blocks.{l}.resid_pre"
            consumers[name] = each([consumers[name], keep]) if name in consumers else keep

    def _first_changed(self, tokens: torch.Tensor, interventions) -> int:
        """The first block an intervention pass can start at: that of its earliest hook, when
        the base pass kept the inputs of these tokens at the RoPE scale in force now; else 0."""
        if not (self.layer_inputs and interventions):
            return 0
        kept_tokens, kept_scale = self._kept_for
        if tokens is not kept_tokens or self.model.rope_inference_scale != kept_scale:
            return 0
        layers = [re.match(r"blocks\.(\d+)\.", name) for name, _ in interventions]
        return 0 if None in layers else min(int(m.group(1)) for m in layers)

    def _unchanged_site(self, site: int, fitted) -> tuple:
        """(transfer R², refit R²) of residual site `site` as the base pass left it (the
        input of block `site`), computed once from the kept inputs in the pass's batches."""
        if (site, id(fitted)) not in self._unchanged:
            states = self.layer_inputs[site]
            n_b = len(self.halves(len(states))[1])
            d = self.model.cfg.d_model
            scorer = probes.Scorer(fitted[site]["log"], self.positions, n_b)
            data, held = self._probe_data(d), probes.ProbeData(d, 1)
            consume = self._scoring(scorer, data, held)
            for begin in range(0, len(states), self.batch):
                rows = torch.arange(begin, min(begin + self.batch, len(states)))
                consume(states[rows], rows)
            self._unchanged[site, id(fitted)] = (
                scorer.result().r2,
                probes.r2_of_moments(data.fit("log"), held),
            )
        return self._unchanged[site, id(fitted)]

    def _scoring(self, scorer, data: probes.ProbeData, held: probes.ProbeData):
        """The consumer of one residual site in an intervention pass: half B scored by the
        base probe, half A's and half B's moments kept for the refit."""
        return each(
            [
                self._held_out(scorer.add),
                self._probe_collector(data),
                self._probe_collector(held, half=1),
            ]
        )

    def _probe_data(self, d: int) -> probes.ProbeData:
        return probes.ProbeData(d, self.opts.probe_folds)

    def _probe_collector(self, data: probes.ProbeData, half: int = 0):
        """A consumer adding half A's sequences (even rows; half=1: odd rows, half B) to a
        probe's sums, folded by sequence."""
        P = len(self.positions)

        def consume(resid, rows):
            mine = rows % 2 == half
            x = resid[mine, self.opts.probe_min_pos :]
            groups = (rows[mine] // 2).repeat_interleave(P)
            data.add(x.reshape(-1, x.shape[-1]), self.positions.repeat(len(x)), groups)

        return consume

    def _held_out(self, add):
        """A consumer passing half-B sequences (odd rows) to add(resid, index within B)."""

        def consume(resid, rows):
            held = rows % 2 == 1
            add(resid[held, self.opts.probe_min_pos :], rows[held] // 2)

        return consume

    def design(self, layer: int) -> measures.TwoWayDesign:
        """The two-way fit's design of an attention layer: its own visible pairs."""
        return self._designs[self.windows[layer]]

    def halves(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(n)
        return index[index % 2 == 0], index[index % 2 == 1]

    def set_rope_scale(self, scale: float) -> None:
        if self.model.cfg.scheme.inference_scale:
            self.model.set_rope_scale(scale)
        elif scale != 1:
            raise ValueError(
                f"--rope-scale needs a RoPE model; this run is {self.model.cfg.position!r}"
            )

    # ---------------------------------------------------------------- summary
    def summary(self, seconds: float) -> dict:
        return summarise(self, seconds)


def analysis_bytes(opts: Options, L: int, H: int, T: int, window: int | None, d: int) -> float:
    """What the largest stage keeps at once: per-block logit sums and the key-0 column of
    every layer, the probes' statistics, the fit's design, one batch's attention maps."""
    w = min(T, window or T)
    pairs = T * w - w * (w - 1) // 2  # visible (query, key) pairs
    blocks = min(opts.blocks, opts.seqs)
    per_layer = blocks * H * pairs * 4 + opts.seqs * H * T * 4
    probes_ = (L + 1) * (opts.probe_folds + 1) * d * d * 8
    design = 4 * T * T * 8 + 4 * pairs * 8
    attention = 3 * 4 * max(opts.max_attention_elements, H * T * T)
    return L * per_layer + probes_ + design + attention


def subject_of(target: str | Path, opts: Options) -> Subject:
    """A run directory, or `hf:PATH_OR_NAME` for a pretrained transformers model."""
    check_device(opts.device)
    if str(target).startswith("hf:"):
        from posleak.analysis.pretrained import models as pretrained  # imports transformers

        if opts.step is not None:
            raise ValueError("--step selects a checkpoint of a posleak run, not of hf: models")
        return pretrained.subject(str(target)[3:], opts.data, opts.seq_len, opts.device, opts.dtype)
    if opts.dtype != "float32":
        raise ValueError("--dtype applies to hf: models; a posleak run is analysed in float32")
    subject = run_subject(target, opts.step, opts.data)
    subject.model.to(opts.device)
    return subject


def check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} cannot run an analysis; use cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} needs a CUDA device; this machine has none: use cpu")


def default_out(target: str | Path) -> Path:
    """RUN/analysis, or analyses/NAME for a pretrained model hf:.../NAME."""
    if str(target).startswith("hf:"):
        from posleak.analysis.pretrained.models import short_name

        return Path("analyses") / short_name(str(target)[3:])
    return Path(target) / "analysis"


def analysis_of(target: str | Path, opts: Options = Options()) -> Analysis:
    return Analysis(subject_of(target, opts), opts)


def analyze(target: str | Path, opts: Options = Options(), out: str | Path | None = None) -> dict:
    """Analyse one run or pretrained model; write records, summary and figures into out."""
    folder = AnalysisDir(out or default_out(target))
    folder.check_writable()  # before loading the model
    return write_analysis(analysis_of(target, opts), folder)


def write_analysis(analysis: Analysis, folder: AnalysisDir) -> dict:
    """Run every stage of a prepared analysis and write its records, summary and figures."""
    folder.check_writable()  # before minutes of work
    rows, summary = analysis.run_all()
    with folder.writing():
        folder.write(rows, summary)
        figure = plots.run_figures({summary["variant"]: [rows]}, folder.path, analysis.subject.name)
        folder.write_report(run_report(summary, figure.name))
    return summary
