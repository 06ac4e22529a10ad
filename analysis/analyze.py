"""`posleak analyze RUN|hf:MODEL [--seqs N] [--step S] [--seq-len L] [--rope-scale S] [--data SRC]
[--bos always|never] [--device D] [--dtype T] [--out D]`

Runs every measurement of docs/science.md (definitions version 2) on a trained run's latest
good checkpoint, or on a pretrained transformers model, over held-out sequences, and writes
records.jsonl (tidy rows), summary.json (headline numbers) and figures into RUN/analysis (or
--out; a pretrained model's default is analyses/NAME).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from posleak.analysis import measures, plots
from posleak.analysis import probe as probes
from posleak.analysis.collect import LogitSums, Subject, run_subject, stream
from posleak.analysis.folder import AnalysisDir
from posleak.analysis.logits import LogitStats, early_sum, logit_stats, pooled
from posleak.analysis.records import Recorder
from posleak.analysis.stats import bootstrap_weights, percentile_interval
from posleak.analysis.summary import EARLY, run_report, summarise
from posleak.model.masks import attention_mask
from posleak.train.environment import check_fits


@dataclass(frozen=True)
class Options:
    """Every choice of the analysis that the definitions leave to us, with its default."""

    seqs: int = 256
    step: int | None = None  # checkpoint to analyse; default: the newest that verifies
    seq_len: int | None = None  # default: the run's training length
    rope_scale: float | None = None  # NTK scaling applied at inference (composes with trained)
    data: str | None = None  # default: the run's data source (a pretrained model: bible)
    bos: str | None = None  # BOS policy of the sequences; default: the run's, or the tokenizer's
    device: str = "cpu"
    dtype: str = "float32"  # a pretrained model's weights; a posleak run is analysed in float32
    sink_eps: float = 0.3  # a head is a sink head when alpha_0 > sink_eps
    probe_min_pos: int = 1  # probe positions >= this (0 holds BOS, identifiable by token)
    probe_folds: int = 5  # cross-validation folds (grouped by sequence) for the ridge strength
    early_queries: int = 16  # the A_i0 profile of every head is reported for i < this
    fingerprint_seqs: int = 32
    fingerprint_query: int = 8  # query i at which a head's position-0 output is compared
    early_k: tuple = (8, 16, 32, 64)  # BOS replacement: removed share over queries i < k
    swaps: tuple = ("mean", "token", "random", "zeros")
    knockout: bool = True  # key-0 knockout in all layers at once
    knockout_per_layer: bool = False  # also one layer at a time (one more pass per layer)
    content_seqs: int = 32  # c_content's second pass reads the first this many sequences
    shift_seqs: int = 32  # sequences for the shift test (two passes of their own)
    blocks: int = 16  # sequence blocks (even): halves A/B and units of the bootstrap
    bootstrap: int = 200  # bootstrap replicates for intervals over sequences
    extrapolation: tuple = (1, 2, 4, 8)  # loss per position at these multiples of T_train
    extrapolation_seqs: int = 32
    batch_size: int = 32
    max_attention_elements: int = 1 << 25  # the batch shrinks so B*H*T*T stays below this

    def problems(self, train_len: int) -> list[str]:
        out = []
        T = train_len if self.seq_len is None else self.seq_len
        if self.seqs < 4:
            out.append(f"--seqs must be at least 4 (two halves of two sequences), got {self.seqs}")
        if T < max(4, self.probe_min_pos + 3):
            out.append(f"--seq-len must be at least 4 for the probe and the fits, got {T}")
        if self.rope_scale is not None and not (
            math.isfinite(self.rope_scale) and self.rope_scale >= 1
        ):
            out.append(f"--rope-scale must be finite and >= 1 (1 = none), got {self.rope_scale}")
        if self.bos not in (None, "always", "never"):
            out.append(f"--bos must be always or never, got {self.bos!r}")
        return out


class Pass(NamedTuple):
    """What one forward pass over the analysis sequences leaves behind."""

    logits: list[LogitStats]  # per attention layer
    probe_data: list[probes.ProbeData]  # per residual site, half A (base pass only)
    first_column: list[torch.Tensor]  # per attention layer: A_i0, (N, H, T) (base pass only)
    probe_r2_log: list[float] | None  # the base probes scored on half B (interventions only)


class Analysis:
    def __init__(self, subject: Subject, opts: Options):
        self.subject, self.opts = subject, opts
        self.model = subject.model
        problems = opts.problems(subject.train_len)
        if problems:
            raise ValueError("; ".join(problems))
        self._set_rope_scale(opts.rope_scale or 1.0)
        self.T = subject.train_len if opts.seq_len is None else opts.seq_len
        self.bos = opts.bos or subject.bos
        self.L, self.H = self.model.cfg.n_layer, self.model.cfg.n_head
        self.window = self.model.cfg.window
        check_fits(
            analysis_bytes(opts, self.L, self.H, self.T, self.window, self.model.cfg.d_model),
            f"analysing {opts.seqs} sequences of {self.T} tokens",
            "lower --seqs or --seq-len",
        )
        self.visible = attention_mask(self.T, self.window)
        self.design = measures.two_way_design(self.visible)
        self.label = subject.label
        self.rec = Recorder(run=subject.name, **self.label)
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

    def tokens(self, n: int, seq_len: int, stream_name: str, bos: str | None = None):
        """(n, seq_len + 1) held-out tokens; the model reads [:, :seq_len]."""
        return self.subject.draw(n, seq_len, bos or self.bos, stream_name)

    def run_all(self) -> tuple[list[dict], dict]:
        started = time.perf_counter()
        tokens = self.tokens(self.opts.seqs, self.T, "analysis")[:, : self.T]
        with self._timed("base pass, probes, logits, sinks"):
            base = self.measure(tokens)
            fitted = self.record_probes(base, tokens)
            self.record_logits(base, tokens)
            self.record_sinks(base)
        with self._timed("BOS replacements"):
            for kind in self.opts.swaps:
                self.record_swap(kind, tokens, base, fitted)
        with self._timed("key-0 knockout"):
            if self.opts.knockout:
                per_layer = list(range(self.L)) if self.opts.knockout_per_layer else []
                for target in [*per_layer, "all"]:
                    self.record_knockout(target, tokens, base, fitted)
        for name, stage in (
            ("fingerprint", self.fingerprints),
            ("shift test", self.shift_test),
            ("length extrapolation", self.extrapolation),
        ):
            with self._timed(name):
                stage()
        return self.rec.rows, self.summary(time.perf_counter() - started)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        started = time.perf_counter()
        yield
        self.timings[stage] = round(time.perf_counter() - started, 2)

    # ---------------------------------------------------------------- one pass
    def measure(self, tokens: torch.Tensor, interventions=(), fitted=None) -> Pass:
        """Logit sums, the probes' half-A sums and the key-0 column, accumulated batch by batch.

        Given the base pass's fitted probes (an intervention pass), the residual stream is
        scored on half B as it streams past instead."""
        sums = [LogitSums(self.n_blocks, self.H, self.visible) for _ in range(self.L)]
        consumers = {f"blocks.{l}.attn.scores": sums[l].add for l in range(self.L)}
        data, first, scorers = [], [], []
        if fitted is None:
            d = self.model.cfg.d_model
            data = [self._probe_data(d) for _ in self.resid_names]
            first = [torch.empty(len(tokens), self.H, self.T) for _ in range(self.L)]
            for l in range(self.L):
                consumers[f"blocks.{l}.attn.pattern"] = _store(first[l], _key0_column)
            for site, name in enumerate(self.resid_names):
                consumers[name] = self._probe_collector(data[site])
        else:
            n_b = len(self.halves(len(tokens))[1])
            scorers = [probes.Scorer(p["log"], self.positions, n_b) for p in fitted]
            for site, name in enumerate(self.resid_names):
                consumers[name] = self._held_out(scorers[site].add)
        stream(self.model, tokens, consumers, self.batch, list(interventions))
        stats = [logit_stats(s, self.design, self.boot_a, self.boot_b) for s in sums]
        r2 = [s.result().r2 for s in scorers] if fitted else None
        return Pass(stats, data, first, r2)

    def _probe_data(self, d: int) -> probes.ProbeData:
        return probes.ProbeData(d, self.opts.probe_folds)

    def _probe_collector(self, data: probes.ProbeData):
        """A consumer adding half-A sequences (even rows) to a probe's sums; fold by sequence."""
        P = len(self.positions)

        def consume(resid, rows):
            mine = rows % 2 == 0
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

    def halves(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(n)
        return index[index % 2 == 0], index[index % 2 == 1]

    # ---------------------------------------------------------------- 1: probes
    def record_probes(self, base: Pass, tokens: torch.Tensor) -> list[dict]:
        """Fit both probes per residual site on half A (lambda cross-validated), then score
        them on half B in a pass of its own (nothing of the stream is kept in memory)."""
        b = self.halves(len(tokens))[1]
        targets = (("linear", ""), ("log", "_log"))
        fitted = [{t: data.fit(t) for t, _ in targets} for data in base.probe_data]
        scorers = [
            {t: probes.Scorer(site[t], self.positions, len(b)) for t, _ in targets}
            for site in fitted
        ]
        consumers = {}
        for name, site in zip(self.resid_names, scorers, strict=True):
            consumers[name] = _each(
                [
                    lambda resid, rows, s=s: s.add(resid[:, self.opts.probe_min_pos :], rows)
                    for s in site.values()
                ]
            )
        stream(self.model, tokens[b], consumers, self.batch)
        weights = bootstrap_weights(len(b), self.opts.bootstrap, seed=3)
        add = self.rec.add
        for layer, (site, site_scorers) in enumerate(zip(fitted, scorers, strict=True)):
            for target, suffix in targets:
                s = site_scorers[target].result()
                lo, hi = probes.r2_interval(s, weights)
                add(f"probe_r2{suffix}", s.r2, layer=layer, lo=lo, hi=hi, n=len(b))
                add(f"probe_mae{suffix}", s.mae, layer=layer, n=len(b))
                add(f"probe_lambda{suffix}", site[target].lam, layer=layer)
            add(
                "probe_mae_mean",
                probes.mean_baseline_mae(self.positions, self.positions),
                layer=layer,
            )
            add("probe_mae_uniform", measures.uniform_guess_mae(len(self.positions)), layer=layer)
        return fitted

    # ---------------------------------------------------------------- 2: logits
    def record_logits(self, base: Pass, tokens: torch.Tensor) -> None:
        add = self.rec.add
        content = self.content_deviation(tokens, base)
        for l, st in enumerate(base.logits):
            self._record_signal(l, st.signal, st.signal_boot, None)
            for h in range(self.H):
                self._record_signal(l, st.signal[h], st.signal_boot[:, h], h)
                add("abs_share", st.abs_share[h], layer=l, head=h)
                for i in range(self.T):
                    add("c_mask", st.c_mask[h, i], layer=l, head=h, query=i)
                    add("g_rel", st.g[h, i] - st.g[h, 0], layer=l, head=h, query=i)
            add("abs_share", st.share_num.sum() / st.share_den.sum(), layer=l)
            for i in range(self.T):
                add("c_mask", st.c_mask[:, i].mean(), layer=l, query=i)
                add("c_content", content[l][i], layer=l, query=i)

    def _record_signal(self, layer: int, signal, boot, head) -> None:
        """C_res(i) with its bootstrap interval, and the signed mean square with its SE."""
        if head is None:
            signal, boot = pooled(signal), pooled(boot)
        lo, hi = percentile_interval(boot)
        se = boot.std(0)
        for i in range(self.T):
            add = self.rec.add
            add(
                "c_res",
                measures.c_res(signal[i]),
                layer=layer,
                head=head,
                query=i,
                lo=measures.c_res(lo[i]),
                hi=measures.c_res(hi[i]),
                n=self.opts.seqs,
            )
            add(
                "c_res_signal",
                signal[i],
                layer=layer,
                head=head,
                query=i,
                std=se[i],
                n=self.opts.seqs,
            )

    def content_deviation(self, tokens: torch.Tensor, base: Pass) -> list[torch.Tensor]:
        """c_content(i) per layer: mean over sequences and visible j of |s_ij - M_ij|, pooled
        over heads. M must be known first, so this is a second pass, over the first
        `content_seqs` sequences (a subsample of the mean over sequences)."""
        tokens = tokens[: self.opts.content_seqs]
        totals = [torch.zeros(self.H, self.T, dtype=torch.float64) for _ in range(self.L)]

        def consumer(l):
            def add(scores, rows):
                totals[l] += measures.content_deviation(
                    scores, base.logits[l].mean, self.design
                ).sum(0)

            return add

        consumers = {f"blocks.{l}.attn.scores": consumer(l) for l in range(self.L)}
        stream(self.model, tokens, consumers, self.batch)
        rows = self.design.rows * len(tokens)
        return [(t / rows).mean(0) for t in totals]

    # ---------------------------------------------------------------- 3: sinks
    def record_sinks(self, base: Pass) -> None:
        add, eps = self.rec.add, self.opts.sink_eps
        weights = bootstrap_weights(self.opts.seqs, self.opts.bootstrap, seed=4)
        early = range(1, min(self.opts.early_queries, self.T))
        for l, column in enumerate(base.first_column):
            alpha = measures.sink_alpha(column, self.window)  # (N, H)
            boot = (weights @ alpha) / weights.sum(1, keepdim=True)  # (R, H)
            lo, hi = percentile_interval(boot)
            profile = column.double().mean(0)  # (H, T)
            for h in range(self.H):
                add(
                    "sink_alpha0",
                    alpha[:, h].mean(),
                    layer=l,
                    head=h,
                    std=alpha[:, h].std(),
                    lo=lo[h],
                    hi=hi[h],
                    n=len(alpha),
                )
                for i in early:
                    add("a0_early", profile[h, i], layer=l, head=h, query=i)
                if alpha[:, h].mean() > eps:
                    for i in range(1, self.T):
                        add("sink_gain", profile[h, i], layer=l, head=h, query=i)
            rate = (alpha.mean(0) > eps).double().mean()
            add("sink_rate", rate, layer=l, condition=f"eps={eps}")

    # ---------------------------------------------------------------- 5, 6: interventions
    def replacement(self, kind: str, tokens: torch.Tensor) -> torch.Tensor:
        """The vector that replaces the position-0 embedding (science.md, measurement 5)."""
        table = self.model.embed_tokens.weight.detach().float().cpu()
        body = tokens[:, 1:].flatten()
        if kind == "mean":  # frequency-weighted over the tokens that occur in the data
            counts = body.bincount(minlength=len(table)).to(table.dtype)
            return counts @ table / counts.sum()
        if kind == "token":  # the most frequent token of the analysed text
            return table[int(body.bincount().argmax())]
        first = table[tokens[:, 0]].mean(0)
        if kind == "random":
            gen = torch.Generator().manual_seed(self.subject.seed)
            v = torch.randn(table.shape[1], generator=gen, dtype=table.dtype)
            return v * first.norm() / v.norm()
        if kind == "zeros":
            return torch.zeros_like(first)
        raise ValueError(
            f"unknown BOS replacement {kind!r}; choose from mean, token, random, zeros"
        )

    def record_swap(self, kind: str, tokens, base: Pass, fitted) -> None:
        vector = self.replacement(kind, tokens)

        def swap(embed, name):
            embed = embed.clone()
            embed[:, 0] = vector.to(embed.device, embed.dtype)
            return embed

        swapped = self.measure(tokens, [("embed", swap)], fitted=fitted)
        self._record_removal("bos_swap", kind, base, swapped)
        for site, r2 in enumerate(swapped.probe_r2_log):
            self.rec.add("bos_swap_probe_r2_log", r2, layer=site, condition=kind)

    def record_knockout(self, target, tokens, base: Pass, fitted) -> None:
        layers = range(self.L) if target == "all" else [target]
        hooks = [(f"blocks.{l}.attn.pattern", _knockout) for l in layers]
        knocked = self.measure(tokens, hooks, fitted=fitted)
        self._record_removal("knockout", f"layer={target}", base, knocked)
        for site, r2 in enumerate(knocked.probe_r2_log):
            self.rec.add("knockout_probe_r2_log", r2, layer=site, condition=f"layer={target}")

    def _record_removal(self, prefix: str, label: str, base: Pass, other: Pass) -> None:
        """1 - sum C_other(i)^2 / sum C(i)^2 over 1 <= i < k, per layer, with a paired bootstrap
        interval (the same resampled blocks in both passes); and the same for C_mask."""
        for l, (st, ot) in enumerate(zip(base.logits, other.logits, strict=True)):
            for k in (*[k for k in self.opts.early_k if k <= self.T], None):
                cond = f"{label},k={k or 'all'}"
                orig, new = early_sum(pooled(st.signal), k), early_sum(pooled(ot.signal), k)
                boot = 1 - early_sum(pooled(ot.signal_boot), k) / early_sum(
                    pooled(st.signal_boot), k
                )
                lo, hi = percentile_interval(boot)
                self.rec.add(
                    f"{prefix}_removed",
                    measures.removed_fraction(new, orig),
                    layer=l,
                    condition=cond,
                    lo=lo,
                    hi=hi,
                )
                cm = [t.c_mask.mean(0)[1:k].pow(2) for t in (st, ot)]
                self.rec.add(
                    f"{prefix}_removed_c_mask",
                    measures.removed_fraction(cm[1], cm[0]),
                    layer=l,
                    condition=cond,
                )
            if prefix == "bos_swap":
                signal = pooled(other.logits[l].signal)
                for i in range(self.T):
                    self.rec.add(
                        "c_res",
                        measures.c_res(signal[i]),
                        layer=l,
                        query=i,
                        condition=f"swap={label}",
                    )

    # ---------------------------------------------------------------- 4: fingerprint
    def fingerprints(self) -> None:
        """Position-0 states and each head's position-0 output across inputs, batch size 1."""
        i_f = min(self.opts.fingerprint_query, self.T - 1)
        for condition, bos in (("bos", "always"), ("nobos", "never")):
            if bos not in self.subject.bos_policies:  # a tokenizer without a BOS token
                continue
            tokens = self.tokens(self.opts.fingerprint_seqs, self.T, "fingerprint", bos)
            n = len(tokens)
            x0 = [torch.empty(n, self.model.cfg.d_model) for _ in self.resid_names]
            v0 = [torch.empty(n, self.H, self.model.cfg.d_head) for _ in range(self.L)]
            gain = [torch.empty(n, self.H) for _ in range(self.L)]
            consumers = {
                name: _store(x0[s], lambda x: x[:, 0]) for s, name in enumerate(self.resid_names)
            }
            for l in range(self.L):
                consumers[f"blocks.{l}.attn.v"] = _store(v0[l], lambda v: v[:, :, 0])
                consumers[f"blocks.{l}.attn.pattern"] = _store(gain[l], lambda p: p[:, :, i_f, 0])
            stream(self.model, tokens[:, : self.T], consumers, batch_size=1)
            for site, x in enumerate(x0):
                fp = measures.dispersion(x)
                self.rec.add(
                    "fingerprint_dispersion", fp["dispersion"], layer=site, condition=condition
                )
                self.rec.add("fingerprint_cosine", fp["cosine"], layer=site, condition=condition)
            for l in range(self.L):
                self._record_head_fingerprint(l, v0[l], gain[l], condition, i_f)

    def _record_head_fingerprint(self, layer, v0, gain, condition, i_f) -> None:
        o_proj = self.model.output_projection(layer).detach().double().cpu()
        dh = self.model.cfg.d_head
        for h in range(self.H):
            direction = v0[:, h].double() @ o_proj[:, h * dh : (h + 1) * dh].T  # W_O v_0, (n, d)
            value = measures.dispersion(direction)["dispersion"]
            output = measures.dispersion(gain[:, h, None].double() * direction)["dispersion"]
            self.rec.add(
                "fingerprint_value_dispersion", value, layer=layer, head=h, condition=condition
            )
            self.rec.add(
                "fingerprint_head_dispersion",
                output,
                layer=layer,
                head=h,
                query=i_f,
                condition=condition,
            )

    # ---------------------------------------------------------------- 7: shift test
    def shift_test(self) -> None:
        """The same content at offset 1 and 1 + delta (after a fixed filler): JS distance
        between attention rows of matching queries over the content keys only."""
        n = self.T // 2
        delta = self.T - n - 1
        seqs = self.tokens(self.opts.shift_seqs, self.T, "shift")
        filler = self.tokens(1, self.T, "filler")[0, 1 : 1 + delta]
        first, content = seqs[:, :1], seqs[:, 1 : 1 + n]
        near = torch.cat([first, content], dim=1)
        far = torch.cat([first, filler.expand(len(seqs), -1), content], dim=1)
        blocks = [torch.empty(len(seqs), self.H, n, n) for _ in range(self.L)]
        consumers = {
            f"blocks.{l}.attn.pattern": _store(blocks[l], _content_block(1, n))
            for l in range(self.L)
        }
        stream(self.model, near, consumers, self.batch)
        dists = [torch.empty(len(seqs), self.H, n) for _ in range(self.L)]
        consumers = {
            f"blocks.{l}.attn.pattern": self._shift_scorer(blocks[l], dists[l], 1 + delta, n)
            for l in range(self.L)
        }
        stream(self.model, far, consumers, self.batch)
        for l, d in enumerate(dists):
            for m in range(n):
                self.rec.add(
                    "shift_js",
                    d[:, :, m].mean(),
                    layer=l,
                    query=m,
                    std=d[:, :, m].mean(1).std(),
                    n=len(d),
                )
            for h in range(self.H):
                self.rec.add("shift_js", d[:, h].mean(), layer=l, head=h)
            self.rec.add("shift_js", d.mean(), layer=l, condition=f"delta={delta}")

    @staticmethod
    def _shift_scorer(near_blocks, out, start_far: int, n: int):
        def consume(pattern, rows):
            far_block = pattern[..., start_far : start_far + n, start_far : start_far + n]
            out[rows] = measures.shift_distances(near_blocks[rows], far_block, 0, 0, n).float()

        return consume

    # ---------------------------------------------------------------- 8: length extrapolation
    def extrapolation(self) -> None:
        """Validation loss per position at multiples of the training length, and for RoPE models
        also with NTK scaling at inference (s = the length ratio, composed with a trained s)."""
        T0, cfg = (self.subject.train_len if self.subject.extrapolate else self.T), self.model.cfg
        for m in self.opts.extrapolation if self.subject.extrapolate else (1,):
            length = T0 * m
            if cfg.position == "learned" and length > cfg.max_seq_len:
                continue
            try:
                tokens = self.tokens(self.opts.extrapolation_seqs, length, "extrapolation")
            except ValueError:  # the validation split is shorter than this length
                continue
            scales = [1.0, float(m)] if cfg.position.startswith("rope") and m > 1 else [1.0]
            for s in scales:
                self._set_rope_scale(s)
                losses = self._loss_by_position(tokens)
                cond = f"len={length}" + (f",ntk={s:g}" if s > 1 else "")
                for i in range(length):
                    self.rec.add("loss_by_position", losses[i], query=i, condition=cond)
                self.rec.add("loss_mean", losses.mean(), condition=cond)
                self.rec.add(
                    "loss_beyond_train", losses[T0:].mean() if m > 1 else None, condition=cond
                )
        self._set_rope_scale(self.opts.rope_scale or 1.0)

    def _set_rope_scale(self, scale: float) -> None:
        if self.model.cfg.position.startswith("rope"):
            self.model.set_rope_scale(scale)
        elif scale != 1:
            raise ValueError(
                f"--rope-scale needs a RoPE model; this run is {self.model.cfg.position!r}"
            )

    @torch.no_grad()
    def _loss_by_position(self, tokens: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(tokens.shape[1] - 1, dtype=torch.float64)
        device = next(self.model.parameters()).device
        T, cfg = tokens.shape[1], self.model.cfg
        attention = self.opts.max_attention_elements // (cfg.n_head * T * T)
        logits = (1 << 25) // (T * cfg.vocab_size)
        step = max(1, min(attention, logits))  # sequences per forward pass
        for chunk in tokens.to(device).split(step):
            logits = self.model(chunk[:, :-1])
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="none"
            ).cpu()
            total += loss.view(len(chunk), -1).double().sum(0)
        return total / len(tokens)

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


def _store(target: torch.Tensor, pick):
    """A consumer that writes pick(activation) into target rows of its sequences."""

    def consume(tensor, rows):
        target[rows] = pick(tensor).float().cpu()

    return consume


def _each(consumers):
    """One consumer feeding several."""

    def consume(tensor, rows):
        for c in consumers:
            c(tensor, rows)

    return consume


def _key0_column(pattern):
    return pattern[..., 0]


def _content_block(start: int, n: int):
    return lambda pattern: pattern[..., start : start + n, start : start + n]


def _knockout(pattern, name):
    return measures.knock_out_key0(pattern)


def subject_of(target: str | Path, opts: Options) -> Subject:
    """A run directory, or `hf:PATH_OR_NAME` for a pretrained transformers model."""
    check_device(opts.device)
    if str(target).startswith("hf:"):
        from posleak.analysis import pretrained  # imports transformers

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
        return Path("analyses") / Path(str(target)[3:].rstrip("/")).name
    return Path(target) / "analysis"


def analysis_of(target: str | Path, opts: Options = Options()) -> Analysis:
    return Analysis(subject_of(target, opts), opts)


def analyze(target: str | Path, opts: Options = Options(), out: str | Path | None = None) -> dict:
    """Analyse one run or pretrained model; write records, summary and figures into out."""
    folder = AnalysisDir(out or default_out(target))
    folder.check_writable()  # before minutes of work
    analysis = analysis_of(target, opts)
    rows, summary = analysis.run_all()
    with folder.writing():
        folder.write(rows, summary)
        figure = plots.run_figures({summary["variant"]: [rows]}, folder.path, analysis.subject.name)
        folder.write_report(run_report(summary, figure.name))
    return summary


def run(args: argparse.Namespace) -> int:
    opts = Options(
        seqs=args.seqs,
        step=args.step,
        seq_len=args.seq_len,
        rope_scale=args.rope_scale,
        data=args.data,
        bos=args.bos,
        device=args.device,
        dtype=args.dtype,
    )
    try:
        summary = analyze(args.run, opts, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or default_out(args.run))
    layers = summary["per_layer"]
    print(f"analysis: {out} ({summary['seconds']:.1f}s)")
    interval = layers["probe_r2_log_interval"]
    probe = [
        f"{r2:.2f} [{interval[l][0]:.2f}, {interval[l][1]:.2f}]"
        if r2 is not None and None not in interval.get(l, [None])
        else "nan"
        for l, r2 in layers["probe_r2_log"].items()
    ]
    print(f"probe R^2 (log target) by layer, [95% bootstrap over {opts.seqs} sequences]:")
    print("  " + "  ".join(probe))
    print(
        f"C_res RMS over queries 1-{EARLY - 1} by layer: " + _row(layers["c_res_early"], "{:.3f}")
    )
    print(f"report: {out / 'report.md'} (figure {out / 'report.png'})")
    return 0


def _row(values: dict, fmt: str) -> str:
    return " ".join(fmt.format(v) if v is not None else "nan" for v in values.values())
