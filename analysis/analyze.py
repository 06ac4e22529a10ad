"""`posleak analyze RUN [--seqs N] [--seq-len L] [--rope-scale S] [--data SOURCE] [--out DIR]`

Runs every measurement of ../shared/science.md on a trained run's latest checkpoint over
held-out sequences, and writes analysis/records.jsonl (tidy rows), analysis/summary.json
(headline numbers per layer) and figures into the run (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis import measures, plots
from analysis.collect import (
    collect,
    first_key_column,
    held_out_tokens,
    keep,
    load_run,
    position_zero,
    run_label,
)
from analysis.probe import position_probe
from analysis.records import Recorder, write
from data import vocab_size_of
from model.masks import attention_mask


@dataclass(frozen=True)
class Options:
    seqs: int = 256
    seq_len: int | None = None  # default: the run's training length
    rope_scale: float | None = None  # NTK scaling applied at inference
    data: str | None = None  # default: the run's data source
    sink_eps: float = 0.3  # a head is a sink head when alpha_0 > sink_eps
    probe_alpha: float = 1e-2  # ridge strength (lambda = alpha * n_train)
    probe_min_pos: int = 1  # probe positions >= this (0 holds BOS, identifiable by token)
    fingerprint_seqs: int = 32
    early_k: tuple = (8, 16, 32, 64)
    swaps: tuple = ("mean", "token", "random", "zeros")
    batch_size: int = 32


class Analysis:
    def __init__(self, run_dir: str | Path, opts: Options):
        self.run_dir, self.opts = Path(run_dir), opts
        self.model, self.cfg, self.state = load_run(run_dir)
        if opts.rope_scale:
            self.model.set_rope_scale(opts.rope_scale)
        self.data = self.cfg.data
        if opts.data:
            self.data = dataclasses.replace(self.data, source=opts.data)
            size = vocab_size_of(self.data)
            if size != vocab_size_of(self.cfg.data):
                raise ValueError(
                    f"data source {opts.data!r} has a vocabulary of {size} tokens but the run "
                    f"was trained on {self.cfg.data.source!r} with {vocab_size_of(self.cfg.data)}; "
                    "its special tokens (BOS) would not match: analyse on data of the same kind"
                )
        self.T = opts.seq_len or self.cfg.data.seq_len
        self.L, self.H = self.model.cfg.n_layer, self.model.cfg.n_head
        self.visible = attention_mask(self.T, self.model.cfg.window)
        self.label = run_label(self.run_dir, self.cfg)
        self.rec = Recorder(run=self.run_dir.name, **self.label)
        self.resid_names = ["blocks.0.resid_pre"] + [
            f"blocks.{layer}.resid_post" for layer in range(self.L)
        ]

    def tokens(self, bos: str, n: int | None = None, stream: str = "analysis") -> torch.Tensor:
        return held_out_tokens(self.data, self.cfg.seed, n or self.opts.seqs, self.T, bos, stream)

    def run_all(self) -> tuple[list[dict], dict]:
        started = time.perf_counter()
        bos_tokens = self.tokens("always")
        primary = bos_tokens if self.cfg.data.bos == "always" else self.tokens("never")
        base = self.logits_and_probes(primary, record=True)
        self.delta_r2_null(primary)
        self.fingerprints()
        if primary is not bos_tokens:
            base = self.logits_and_probes(bos_tokens, record=False)
        self.bos_swaps(bos_tokens, base)
        self.shift_test()
        summary = self.summary(time.perf_counter() - started)
        return self.rec.rows, summary

    # ---------------------------------------------------------------- 1-4
    def extract(self) -> dict:
        names = {name: keep for name in self.resid_names}
        for layer in range(self.L):
            names[f"blocks.{layer}.attn.scores"] = keep
            names[f"blocks.{layer}.attn.pattern"] = first_key_column
        return names

    def logits_and_probes(self, tokens, record: bool, interventions=()) -> dict:
        """Probe curve, decomposition, Delta R^2 and sinks; returns per-layer curves."""
        acts = collect(self.model, tokens, self.extract(), self.opts.batch_size, interventions)
        train = torch.arange(len(tokens)) % 2 == 0  # held out by sequence
        out = {"probe": [], "c_res": [], "c_mask": []}
        for layer, name in enumerate(self.resid_names):
            probe = position_probe(
                acts[name], train, self.opts.probe_min_pos, self.opts.probe_alpha
            )
            out["probe"].append(probe["probe_r2"])
            if record:
                for metric, value in probe.items():
                    self.rec.add(metric, value, layer=layer)
                n_pos = self.T - self.opts.probe_min_pos
                self.rec.add("probe_mae_uniform", measures.uniform_guess_mae(n_pos), layer=layer)
        for layer in range(self.L):
            scores = acts[f"blocks.{layer}.attn.scores"]
            g = measures.relative_profile(scores, self.visible)
            c_mask = measures.c_mask(g, self.visible)  # (H, T)
            c_res = measures.c_res(scores, g, self.visible)  # (N, H, T)
            out["c_mask"].append(c_mask.mean(0))
            out["c_res"].append(c_res["abs"].mean(dim=(0, 1)))
            if record:
                self.record_layer(layer, scores, g, c_mask, c_res, train, acts)
        return out

    def record_layer(self, layer, scores, g, c_mask, c_res, train, acts) -> None:
        add, N = self.rec.add, len(scores)
        per_seq_head_mean = c_res["abs"].mean(1)  # (N, T)
        per_seq_var = c_res["var"].mean(1)
        for i in range(self.T):
            add("c_mask", c_mask[:, i].mean(), layer=layer, query=i)
            add("c_res", per_seq_head_mean[:, i].mean(), layer=layer, query=i,
                std=per_seq_head_mean[:, i].std(), n=N)  # fmt: skip
            add("c_res_var", per_seq_var[:, i].mean(), layer=layer, query=i,
                std=per_seq_var[:, i].std(), n=N)  # fmt: skip
            for h in range(self.H):
                add("g_rel", g[h, i], layer=layer, head=h, query=i)
                add("c_mask", c_mask[h, i], layer=layer, head=h, query=i)
                add("c_res", c_res["abs"][:, h, i].mean(), layer=layer, head=h, query=i,
                    std=c_res["abs"][:, h, i].std(), n=N)  # fmt: skip
        fit = measures.delta_r2(scores, self.visible, train)
        alpha = measures.sink_alpha(acts[f"blocks.{layer}.attn.pattern"])  # (N, H)
        gains = acts[f"blocks.{layer}.attn.pattern"].double().mean(0)  # (H, T)
        for h in range(self.H):
            for name in ("delta", "r2_rel", "r2_full"):
                metric = "delta_r2" if name == "delta" else name
                add(metric, fit[name][h], layer=layer, head=h, n=int((~train).sum()))
            add("sink_alpha0", alpha[:, h].mean(), layer=layer, head=h, std=alpha[:, h].std(), n=N)
            if alpha[:, h].mean() > self.opts.sink_eps:
                for i in range(1, self.T):
                    add("sink_gain", gains[h, i], layer=layer, head=h, query=i)
        add("delta_r2", fit["delta"].mean(), layer=layer)
        rate = (alpha.mean(0) > self.opts.sink_eps).double().mean()
        add("sink_rate", rate, layer=layer, condition=f"eps={self.opts.sink_eps}")

    def delta_r2_null(self, tokens) -> None:
        """Noise floor: Delta R^2 on inputs whose body is circularly shifted by a random
        amount per sequence (position 0 kept), which re-draws where content sits."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        shifted = tokens.clone()
        for row in shifted:
            row[1:] = row[1:].roll(int(torch.randint(1, self.T - 1, (1,), generator=gen)))
        names = {f"blocks.{layer}.attn.scores": keep for layer in range(self.L)}
        acts = collect(self.model, shifted, names, self.opts.batch_size)
        train = torch.arange(len(tokens)) % 2 == 0
        for layer in range(self.L):
            fit = measures.delta_r2(acts[f"blocks.{layer}.attn.scores"], self.visible, train)
            for h in range(self.H):
                self.rec.add("delta_r2_null", fit["delta"][h], layer=layer, head=h)
            self.rec.add("delta_r2_null", fit["delta"].mean(), layer=layer)

    # ---------------------------------------------------------------- 5
    def fingerprints(self) -> None:
        """Position-0 states across inputs, at batch size 1, with and without BOS."""
        for condition, bos in (("bos", "always"), ("nobos", "never")):
            tokens = self.tokens(bos, self.opts.fingerprint_seqs, stream="fingerprint")
            names = {name: position_zero for name in self.resid_names}
            acts = collect(self.model, tokens, names, batch_size=1)
            for layer, name in enumerate(self.resid_names):
                fp = measures.fingerprint(acts[name])
                self.rec.add(
                    "fingerprint_dispersion", fp["dispersion"], layer=layer, condition=condition
                )
                self.rec.add("fingerprint_cosine", fp["cosine"], layer=layer, condition=condition)

    # ---------------------------------------------------------------- 6
    def replacement(self, kind: str, tokens: torch.Tensor) -> torch.Tensor:
        table = self.model.embed_tokens.weight.detach()
        bos = int(tokens[0, 0])
        if kind == "mean":
            return table[:bos].mean(0)
        if kind == "token":  # the most frequent ordinary token of the analysed text
            return table[int(tokens[:, 1:].flatten().bincount().argmax())]
        if kind == "random":
            gen = torch.Generator().manual_seed(self.cfg.seed)
            v = torch.randn(table.shape[1], generator=gen, dtype=table.dtype)
            return v * table[bos].norm() / v.norm()
        if kind == "zeros":
            return torch.zeros_like(table[bos])
        raise ValueError(
            f"unknown BOS replacement {kind!r}; choose from mean, token, random, zeros"
        )

    def bos_swaps(self, tokens, base: dict) -> None:
        """Overwrite only the position-0 embedding, remeasure, report the removed share."""
        for kind in self.opts.swaps:
            vector = self.replacement(kind, tokens)

            def swap(embed, name, vector=vector):
                embed = embed.clone()
                embed[:, 0] = vector.to(embed.dtype)
                return embed

            swapped = self.logits_and_probes(tokens, record=False, interventions=[("embed", swap)])
            for k in (*self.opts.early_k, None):
                stop = k if k is not None else self.T
                cond = f"{kind},k={k if k is not None else 'all'}"
                for layer in range(self.L):
                    for metric, key in (
                        ("bos_swap_removed", "c_res"),
                        ("bos_swap_removed_c_mask", "c_mask"),
                    ):
                        removed = measures.removed_fraction(
                            swapped[key][layer][:stop].mean().item(),
                            base[key][layer][:stop].mean().item(),
                        )
                        self.rec.add(metric, removed, layer=layer, condition=cond)
            for layer in range(self.L + 1):
                removed = measures.removed_fraction(swapped["probe"][layer], base["probe"][layer])
                self.rec.add("bos_swap_removed_probe", removed, layer=layer, condition=kind)

    # ---------------------------------------------------------------- 7
    def shift_test(self) -> None:
        """The same content at offset 1 and at offset 1 + delta (after a fixed filler, with
        position 0 unchanged): JS distance between attention rows of matching queries,
        restricted to position 0 and the content keys and renormalised."""
        content_len = self.T // 2
        delta = self.T - content_len - 1
        seqs = self.tokens(self.cfg.data.bos, stream="shift")
        filler = self.tokens(self.cfg.data.bos, 1, stream="filler")[0, 1 : 1 + delta]
        first, content = seqs[:, :1], seqs[:, 1 : 1 + content_len]
        near = torch.cat([first, content], dim=1)
        far = torch.cat([first, filler.expand(len(seqs), -1), content], dim=1)
        names = {f"blocks.{layer}.attn.pattern": keep for layer in range(self.L)}
        a = collect(self.model, near, names, self.opts.batch_size)
        b = collect(self.model, far, names, self.opts.batch_size)
        for layer in range(self.L):
            pa, pb = a[f"blocks.{layer}.attn.pattern"], b[f"blocks.{layer}.attn.pattern"]
            dists = []
            for m in range(content_len):
                keys_a = [0, *range(1, 2 + m)]
                keys_b = [0, *range(1 + delta, 2 + delta + m)]
                ra, rb = pa[:, :, 1 + m, keys_a], pb[:, :, 1 + delta + m, keys_b]
                ra = ra / ra.sum(-1, keepdim=True).clamp_min(1e-30)
                rb = rb / rb.sum(-1, keepdim=True).clamp_min(1e-30)
                d = measures.js_distance(ra, rb)  # (N, H)
                dists.append(d)
                self.rec.add(
                    "shift_js", d.mean(), layer=layer, query=m, std=d.mean(1).std(), n=len(d)
                )
            per_head = torch.stack(dists).mean(0)  # (N, H)
            for h in range(self.H):
                self.rec.add("shift_js", per_head[:, h].mean(), layer=layer, head=h)
            self.rec.add("shift_js", per_head.mean(), layer=layer, condition=f"delta={delta}")

    # ---------------------------------------------------------------- summary
    def summary(self, seconds: float) -> dict:
        rows = self.rec.rows

        def layer_values(metric, **where):
            return {
                r["layer"]: r["value"]
                for r in rows
                if r["metric"] == metric and r["head"] is None and r["query"] is None
                and all(r.get(k) == v for k, v in where.items())
            }  # fmt: skip

        def layer_mean(metric):
            acc: dict = {}
            for r in rows:
                if r["metric"] == metric and r["head"] is None and r["query"] is not None:
                    acc.setdefault(r["layer"], []).append(r["value"])
            return {k: sum(v) / len(v) for k, v in acc.items()}

        run_summary = self.run_dir / "summary.json"
        val_loss = (
            json.loads(run_summary.read_text())["final_val_loss"] if run_summary.exists() else None
        )
        per_layer = {
            "probe_r2": layer_values("probe_r2"),
            "probe_r2_log": layer_values("probe_r2_log"),
            "probe_mae": layer_values("probe_mae"),
            "delta_r2": layer_values("delta_r2"),
            "delta_r2_null": layer_values("delta_r2_null"),
            "c_mask": layer_mean("c_mask"),
            "c_res": layer_mean("c_res"),
            "sink_rate": layer_values("sink_rate", condition=f"eps={self.opts.sink_eps}"),
            "fingerprint_dispersion_bos": layer_values("fingerprint_dispersion", condition="bos"),
            "fingerprint_dispersion_nobos": layer_values(
                "fingerprint_dispersion", condition="nobos"
            ),
            "shift_js": {
                r["layer"]: r["value"] for r in rows if r["metric"] == "shift_js" and r["condition"]
            },
        }
        for k in (*self.opts.early_k, "all"):
            per_layer[f"bos_swap_removed_mean_k{k}"] = layer_values(
                "bos_swap_removed", condition=f"mean,k={k}"
            )
        return {
            **self.label,
            "run": str(self.run_dir),
            "checkpoint": self.state["checkpoint"],
            "step": self.state["step"],
            "val_loss": val_loss,
            "position": self.model.cfg.position,
            "window": self.model.cfg.window,
            "rope_base": self.model.rope_base,
            "seqs": self.opts.seqs,
            "seq_len": self.T,
            "data": self.data.source,
            "seconds": round(seconds, 2),
            "per_layer": per_layer,
        }


def analyze(run_dir: str | Path, opts: Options = Options(), out: str | Path | None = None) -> dict:
    """Analyse one run; write records, summary and figures into out (default RUN/analysis)."""
    analysis = Analysis(run_dir, opts)
    rows, summary = analysis.run_all()
    out = Path(out or Path(run_dir) / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    write(out / "records.jsonl", rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots.run_figures({summary["variant"]: [rows]}, out, title=Path(run_dir).name)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (holds config.toml and checkpoints/)")
    parser.add_argument("--seqs", type=int, default=Options.seqs, help="held-out sequences")
    parser.add_argument("--seq-len", type=int, help="sequence length (default: training length)")
    parser.add_argument("--rope-scale", type=float, help="apply static NTK scaling s at inference")
    parser.add_argument("--data", help="data source to analyse on (default: the run's)")
    parser.add_argument("--out", help="output directory (default: RUN/analysis)")


def run(args: argparse.Namespace) -> int:
    opts = Options(seqs=args.seqs, seq_len=args.seq_len, rope_scale=args.rope_scale, data=args.data)
    try:
        summary = analyze(args.run, opts, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.run) / "analysis")
    layers = summary["per_layer"]
    print(f"analysis: {out} ({summary['seconds']:.1f}s)")
    print("probe R^2 by layer: " + " ".join(f"{v:.2f}" for v in layers["probe_r2"].values()))
    print("C_res by layer:     " + " ".join(f"{v:.3f}" for v in layers["c_res"].values()))
    print(f"report: {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    from posleak.cli import standalone

    sys.exit(standalone(__doc__, "python -m analysis.analyze", add_arguments, run))
