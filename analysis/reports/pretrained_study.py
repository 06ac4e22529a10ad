"""`posleak pretrained-study hf:MODEL ... [--quantised RUN] [--seqs N] [--seq-len T]`

The three claims inside pretrained models, as contrasts within one checkpoint (definitions
version 3, item 9), with bootstrap intervals over sequences:
  - each model analysed with BOS at position 0 and without (`bos-always`, `bos-never`), its
    tokenizer's own habit also under NTK at inference (s = 2, 4, 8) on the same sequences;
  - a hybrid model (window and global layers, Gemma 3) whose window does not bind at T also
    at a length beyond it (`long`: the window contrast inside the model, fewer sequences, no
    interventions);
  - with --quantised RUN, one of our RoPE runs written as GGUF at F32 and at Q4_0 and analysed
    through the same loader as the pretrained files: what Q4 alone moves.
Analyses live in WORK/NAME/KIND (default runs/pretrained) and are reused when their options
match; the report (Markdown) goes to --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from posleak.analysis.engine.analyze import Analysis, subject_of, write_analysis
from posleak.analysis.engine.folder import AnalysisDir
from posleak.analysis.engine.options import Options
from posleak.analysis.engine.records import matches
from posleak.analysis.engine.reuse import current_in
from posleak.analysis.maths.measures import DEFINITIONS
from posleak.analysis.pretrained.models import short_name
from posleak.analysis.reports import results
from posleak.analysis.reports.bos_shares import BROKEN_NATS, family_sentence, swap_passes
from posleak.analysis.reports.study import write_report as write_markdown
from posleak.analysis.stages import NUMBERS
from posleak.analysis.stages.bos_swap import PASSES
from posleak.analysis.stages.knockout_loss import EXCESS
from posleak.files import atomic_write, safe_dir, sha256_file
from posleak.log import log
from posleak.report import number, table
from posleak.train.rundir import RunDir

NTK_SCALES = (2.0, 4.0, 8.0)
REDUCED = dict(swaps=(), knockout=False, extrapolation=(), ntk_scales=())  # the long analysis
QUANTS = ("F32", "Q4_0")


def analyses_of(model: str, base: Options, work: Path) -> dict[str, AnalysisDir]:
    """Every analysis the study needs of one hf: model, {kind: folder}, made or reused. The
    model is loaded once for all of them, and not at all when the plan an earlier call made
    with these options is still current (a report rewritten from its analyses)."""
    planned = _planned(model, base, work)
    if planned is not None:
        log.info(f"[pretrained-study] reusing every analysis of {model}, without loading it")
        return planned
    subject = subject_of(model, base)
    native = subject.bos
    plans = {
        f"bos-{policy}": dataclasses.replace(
            base, bos=policy, ntk_scales=NTK_SCALES if policy == native else ()
        )
        for policy in (native, *(p for p in subject.bos_policies if p != native))
    }
    windows = [w for w in getattr(subject.model.cfg, "windows", ()) if w is not None]
    T = base.seq_len or subject.train_len
    if windows and len(set(subject.model.cfg.windows)) > 1 and min(windows) >= T - 1:
        plans["long"] = dataclasses.replace(
            base, **REDUCED, bos=native, seq_len=2 * min(windows), seqs=max(8, base.seqs // 4)
        )
    digest = subject.info.get("gguf_sha256")  # a GGUF file: its analyses follow its content
    name = short_name(model[3:]) + (f"-{digest[:8]}" if digest else "")
    made = {
        kind: _made_or_reused(subject, opts, work / name / kind) for kind, opts in plans.items()
    }
    index = _plans(work)
    index[model] = {
        "base": dataclasses.asdict(base),
        "name": name,
        "gguf_sha256": digest,
        "kinds": {kind: dataclasses.asdict(opts) for kind, opts in plans.items()},
    }
    atomic_write(work / PLANS, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return made


PLANS = "plans.json"  # in WORK: {model: the options each of its analyses was planned with}


def _plans(work: Path) -> dict:
    try:
        index = json.loads((work / PLANS).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _planned(model: str, base: Options, work: Path) -> dict[str, AnalysisDir] | None:
    """The analyses planned for `model` under these options by an earlier call, if each is
    still current under the one reuse rule (a GGUF file's by the sha256 it has now); else
    None, and the model is loaded."""
    entry = _plans(work).get(model)
    if not isinstance(entry, dict) or entry.get("base") != json.loads(
        json.dumps(dataclasses.asdict(base))
    ):
        return None
    digest = entry.get("gguf_sha256")
    if digest is not None:
        from posleak.analysis.pretrained.gguf import locate

        try:
            if sha256_file(locate(model[3:])) != digest:
                return None
        except (OSError, ValueError):
            return None
    folders = {}
    for kind, stored in entry.get("kinds", {}).items():
        folder = AnalysisDir(work / entry["name"] / kind)
        opts = Options.of_summary({"options": stored})
        if not current_in(folder, opts, digest):
            return None
        folders[kind] = folder
    return folders or None


def _made_or_reused(subject, opts: Options, out: Path) -> AnalysisDir:
    """The analysis in `out`, reused under the one rule (engine/reuse.py: a GGUF file's by
    its sha256), else made of the subject already loaded."""
    folder = AnalysisDir(out)
    if current_in(folder, opts, subject.info.get("gguf_sha256")):
        log.info(f"[pretrained-study] reusing {out}")
        return folder
    log.info(f"[pretrained-study] analysing {subject.name} into {out}")
    write_analysis(Analysis(subject, opts), folder)
    return folder


def quantised_analyses(run: Path, base: Options, work: Path) -> dict[str, AnalysisDir]:
    """The run written as GGUF at F32 and at Q4_0 (made once per checkpoint) and analysed
    alike. The file names carry the newest checkpoint's manifest digest, so a run retrained
    in the same folder is exported again rather than read from a stale file."""
    from posleak.train.export import export_gguf

    newest = RunDir(run).checkpoints()
    tag = sha256_file(newest[-1] / "manifest.json")[:10] if newest else "none"
    out = {}
    for quant in QUANTS:
        path = work / "quantisation" / f"{run.name}-{tag}-{quant}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            export_gguf(run, path, quant)
        opts = dataclasses.replace(base, ntk_scales=())
        folder = AnalysisDir(path.with_suffix(""))
        if current_in(folder, opts, sha256_file(path)):  # reused without loading the file
            out[quant] = folder
            continue
        out[quant] = _made_or_reused(subject_of(f"hf:{path}", opts), opts, folder.path)
    return out


# ---------------------------------------------------------------- the report
class Read:
    """One analysis folder's summary and records, with the look-ups the report makes."""

    def __init__(self, folder: AnalysisDir):
        self.summary, self.rows = folder.read_summary(), folder.read_records()
        self.opts = Options.of_summary(self.summary)

    def row(self, metric: str, condition: dict | None = None, layer=None) -> dict | None:
        for r in self.rows:
            if r["metric"] == metric and matches(r, condition) and r["layer"] == layer:
                return r
        return None

    def summary_last(self) -> int:
        """The last residual site (the final layer's output)."""
        return max(r["layer"] for r in self.each("probe_r2_log"))

    def each(self, metric: str, condition: dict | None = None) -> list[dict]:
        return [r for r in self.rows if r["metric"] == metric and matches(r, condition)]


def cell(r: dict | None, digits: int = 3, percent: bool = False) -> str:
    """A value with its interval, or a dash."""
    if r is None or r["value"] is None:
        return "–"
    f = (lambda x: f"{100 * x:.0f}%") if percent else (lambda x: number(x, digits))
    if r.get("lo") is None:
        return f(r["value"])
    return f"{f(r['value'])} [{f(r['lo'])}, {f(r['hi'])}]"


def verdict(r: dict | None, unit: str = "") -> str:
    """What an interval over sequences says: above 0, below 0, or not separated from 0."""
    if r is None or r.get("lo") is None:
        return "not measured"
    if r["lo"] > 0:
        return f"above 0 ({cell(r)}{unit})"
    if r["hi"] < 0:
        return f"below 0 ({cell(r)}{unit})"
    half = (r["hi"] - r["lo"]) / 2
    return (
        f"not separated from 0 ({cell(r)}{unit}; at this N a difference beyond about "
        f"±{number(half, 2)} would have shown)"
    )


def sink_table(read: Read) -> tuple[list[str], dict]:
    """Per layer: sink heads (alpha_0 > eps and lambda_0 >= lift), the strongest head's alpha_0
    beside uniform attention's, lambda_0, the smallest value drain, the massive activation."""
    eps, lift = read.opts.sink_eps, read.opts.sink_lift
    by = {}
    for metric in ("sink_alpha0", "sink_lift", "value_drain"):
        for r in read.each(metric):
            by.setdefault((r["layer"], r["head"]), {})[metric] = r["value"]
    layers = sorted({layer for layer, _ in by})
    rows, sinks = [], {}
    for l in layers:
        heads = {h: v for (layer, h), v in by.items() if layer == l}
        sinks[l] = [
            h for h, v in heads.items() if v["sink_alpha0"] > eps and v["sink_lift"] >= lift
        ]
        uniform = read.row("sink_alpha0_uniform", layer=l)
        massive = read.row("massive_ratio", layer=l + 1)  # the residual after layer l
        rows.append(
            [
                str(l),
                f"{len(sinks[l])}/{len(heads)}",
                f"{number(max(v['sink_alpha0'] for v in heads.values()), 2)} "
                f"({number(uniform['value'] if uniform else None, 2)})",
                number(max(v["sink_lift"] for v in heads.values()), 3),
                number(min(v["value_drain"] for v in heads.values()), 2),
                cell(massive, 3),
            ]
        )
    header = [
        "layer",
        "sink heads",
        "α₀ max (uniform)",
        "λ₀ max",
        "value drain min",
        "‖x₀‖ / median ‖x_i‖ after it",
    ]
    return table(header, rows), sinks


def max_value(rows: list[dict]) -> float | None:
    return max((r["value"] for r in rows), default=None)


def spans(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0–2, 5'."""
    out, start = [], None
    for i, l in enumerate(layers):
        if start is None:
            start = l
        if i + 1 == len(layers) or layers[i + 1] != l + 1:
            out.append(str(start) if start == l else f"{start}–{l}")
            start = None
    return ", ".join(out) or "none"


def model_section(name: str, reads: dict[str, Read]) -> list[str]:
    native_kind = next(k for k in reads if k.startswith("bos-") and reads[k].opts.ntk_scales)
    native = reads[native_kind]
    other = next((reads[k] for k in reads if k.startswith("bos-") and k != native_kind), None)
    s, o = native.summary, native.opts
    heads_total = len(native.each("sink_lift"))
    sink_lines, sinks = sink_table(native)
    with_sinks = [l for l, h in sinks.items() if h]
    n_sinks = sum(len(h) for h in sinks.values())
    windows = sorted({w for w in (s.get("windows") or []) if w})
    lines = [
        f"## {name}",
        "",
        f"{s.get('family', '?')}, {len(sinks)} layers, {heads_total // max(1, len(sinks))} "
        f"heads per layer; GGUF {s.get('quantisation', 'not quantised')}"
        + (f" (sha256 {s['gguf_sha256'][:12]}…)" if s.get("gguf_sha256") else "")
        + f"; its tokenizer {'prepends' if s.get('tokenizer_adds_bos') else 'does not prepend'} "
        f"BOS (`{s.get('bos_token')}`). Analysed on {o.seqs} sequences of {s['seq_len']} tokens "
        f"of the KJV's validation text, BOS {o.bos}; analysis time {s['seconds'] / 60:.1f} min.",
        "",
        "### (c) Sinks",
        "",
        f"{n_sinks} of {heads_total} heads are sink heads (α₀ > {o.sink_eps:g} and λ₀ ≥ "
        f"{o.sink_lift:g}), in layers {spans(with_sinks)}.",
        "",
        *sink_lines,
        "",
    ]
    lines += anchoring(native, other)
    lines += knockouts(native)
    lines += removal(native, other)
    lines += ntk(native)
    contrasted = (
        [
            r
            for r in (reads.get("long"), native)
            if r and r.each("c_res_window_hybrid_diff", {"w": min(windows)})
        ]
        if windows
        else []
    )
    if contrasted:
        lines += hybrid(contrasted[0], windows)
    return lines


def anchoring(native: Read, other: Read | None) -> list[str]:
    """Is the sink anchored to the BOS token or to position 0, and is its output constant?"""
    if other is None:
        return ["The tokenizer has no BOS token: the sink cannot be tested for anchoring.", ""]
    reads = {r.opts.bos: r for r in (native, other)}
    counts = {}
    for policy, read in reads.items():
        _, sinks = sink_table(read)
        counts[policy] = sum(len(h) for h in sinks.values())
    disp = native.each("fingerprint_dispersion", {"bos": "always"}) or other.each(
        "fingerprint_dispersion", "bos"
    )
    nobos = native.each("fingerprint_dispersion", {"bos": "never"}) or other.each(
        "fingerprint_dispersion", "nobos"
    )
    worst, spread = max_value(disp), max_value(nobos)
    head = native.each("fingerprint_head_dispersion", {"bos": "always"})
    return [
        f"**Anchoring.** With BOS at position 0, {counts['always']} heads are sink heads; "
        f"without it (position 0 holds an ordinary token), {counts['never']}. "
        f"With BOS, position 0's hidden state is {'identical' if worst == 0 else 'not identical'} "
        f"across inputs in every layer (largest dispersion {number(worst, 3)}; without BOS up to "
        f"{number(spread, 3)}), so every head's output from key 0 is a fixed vector with a "
        f"query-dependent gain (largest dispersion of a head's key-0 output at query "
        f"{native.opts.fingerprint_query}: {number(max_value(head), 3)}).",
        "",
    ]


def knockouts(read: Read) -> list[str]:
    group = "all"
    rows = [
        [
            label,
            cell(read.row("knockout_loss_change", {"key": key, "heads": heads, "targets": group})),
        ]
        for label, key, heads in (
            ("key 0 knocked out in every head", 0, "all"),
            ("a random earlier key, every head (random-key control)", "random", "all"),
            ("key 0 minus the random-key control (paired per token)", EXCESS, "all"),
            ("key 0 knocked out in the sink heads only", 0, "sinks"),
            ("the same minus its control in those heads", EXCESS, "sinks"),
            ("key 1 knocked out in every head", 1, "all"),
        )
    ]
    refit = read.row(
        "knockout_probe_refit_r2_log", {"layer": "all", "key": 0}, layer=read.summary_last()
    )
    return [
        "**Does the model lean on key 0?** Loss change (nats per token, every position), 95% "
        "bootstrap over sequences:",
        "",
        *table(["knockout", "loss change"], rows),
        "",
        f"Position left to a refit probe at the last layer after key 0's knockout in every layer: "
        f"{cell(refit)} (intact: {cell(read.row('probe_r2_log', layer=read.summary_last()))}).",
        "",
        *mass_destination(read),
    ]


def mass_destination(read: Read) -> list[str]:
    """Where key 0's knockout sends its mass: the new strongest key of each head, and the
    position that becomes massive (a sink rebuilt elsewhere makes "position survives the
    knockout" read a relocated sink, not position without one)."""
    tops = read.each("knockout_top_key", {"key": 0})
    if not tops:
        return []
    keys: dict = {}
    for r in tops:
        keys[int(r["value"])] = keys.get(int(r["value"]), 0) + 1
    ranked = sorted(keys.items(), key=lambda kv: -kv[1])[:3]
    after = [r for r in read.rows if r["metric"] == "knockout_massive_ratio"]
    worst = max(after, key=lambda r: r["value"], default=None)
    intact = [r for r in read.rows if r["metric"] == "massive_ratio_rest"]
    before = next((r for r in intact if worst and r["layer"] == worst["layer"]), None)
    text = (
        "Where the knocked-out mass goes: the strongest key j ≥ 1 after the knockout is "
        + ", ".join(f"key {k} in {n} of {len(tops)} heads" for k, n in ranked)
        + "."
    )
    if worst is not None:
        j = worst["condition"]["position"]
        was = "not measured"
        if before is not None:
            was = f"{before['condition']['position']} at {number(before['value'], 3)}"
        text += (
            f" The most massive position after 0 becomes {j} (‖x_{j}‖ / median "
            f"{number(worst['value'], 3)} at residual site {worst['layer']}; intact, the most "
            f"massive position after 0 there is {was})."
        )
    return [text, ""]


def swap_row(read: Read, kind: str, how: str, number: str, **condition) -> dict | None:
    """The record behind one number of a replacement's pass (bos_swap.PASSES)."""
    declared = NUMBERS[getattr(PASSES[how], number)]
    full = {**declared.where, "swap": kind, **PASSES[how].condition, **condition}
    return read.row(declared.source, full)


def share_cells(read: Read, kind: str, how: str) -> list[str]:
    """The removed shares of one pass of a replacement, content keys and key 0, or "model
    broken"."""
    loss = swap_row(read, kind, how, "loss", queries="early")
    if loss and loss["value"] is not None and loss["value"] > BROKEN_NATS:
        return ["model broken", "model broken"]
    return [
        cell(swap_row(read, kind, how, "share", part=part), percent=True)
        for part in ("content", "key0")
    ]


def removal(native: Read, other: Read | None) -> list[str]:
    """(b): the share of the early-query residual component each BOS replacement removes."""
    k = native.opts.early_queries
    rows = []
    for read in (native, other):
        if read is None or not read.opts.swaps:
            continue
        for kind, how in swap_passes(read.opts):
            rows.append(
                [
                    f"BOS {read.opts.bos}",
                    PASSES[how].label.format(kind=kind),
                    *share_cells(read, kind, how),
                    cell(swap_row(read, kind, how, "loss", queries="early")),
                ]
            )
    deep = native.row("c_res_content")
    floor = native.row("c_res_content_floor")
    return [
        "### (b) Replacing what sits at position 0",
        "",
        f"The residual component at queries 1–{k - 1} over layers ≥ 1 (local fit on i < "
        f"{native.opts.fit_queries}; the content part from a fit on keys j ≥ 1 only, key 0 read "
        f"against it): content keys C² = {cell(deep)} beside a no-signal floor of "
        f"{number(floor['value'] if floor else None, 3)}. Share removed by overwriting position "
        "0's embedding (negative: the replacement adds signal; where the loss at those queries "
        f"rose by more than {BROKEN_NATS:g} nat the model is broken and no share is read), and "
        f"the loss change at the same queries. {family_sentence(native.opts)}".rstrip(),
        "",
        *table(
            [
                "sequences",
                "replacement",
                "removed, content keys",
                "removed, key 0",
                f"loss change, i < {k}",
            ],
            rows,
        ),
        "",
    ]


def ntk(read: Read) -> list[str]:
    """(a), NTK at inference against s = 1 on the same sequences."""
    if not read.opts.ntk_scales:
        return []
    k, last = read.opts.early_queries, read.summary_last()
    rows = [
        [
            f"s = {s:g}",
            cell(read.row("ntk_removed_share", {"s": s, "part": "content"}), percent=True),
            cell(read.row("ntk_removed_share", {"s": s, "part": "key0"}), percent=True),
            cell(read.row("ntk_probe_refit_r2_log", {"s": s}, layer=last)),
            cell(read.row("ntk_loss_change", {"s": s, "queries": "all"})),
        ]
        for s in read.opts.ntk_scales
    ]
    return [
        "### (a) NTK scaling at inference",
        "",
        "The same sequences with the rotary bases scaled as NTK does for s× the context, "
        f"against s = 1 (probe R² at the last layer: {cell(read.row('probe_r2_log', layer=last))}"
        "):",
        "",
        *table(
            [
                "NTK",
                f"removed, content keys, i < {k}",
                "removed, key 0",
                "probe R² (refit, last layer)",
                "loss change",
            ],
            rows,
        ),
        "",
    ]


def hybrid(read: Read, windows: list[int]) -> list[str]:
    """(a) inside a hybrid model: window layers against global layers beyond the window."""
    w = read.opts.contrast_window or min(windows)
    cond = {"w": w}
    diff = read.row("c_res_window_hybrid_diff", cond)
    s = read.summary
    return [
        f"**Window layers against global layers** ({read.opts.seqs} sequences of {s['seq_len']} "
        f"tokens, so that queries {w}–{s['seq_len'] - 1} lie beyond the window of {w}): the "
        f"residual component at those queries on the window's pairs, layers ≥ 1, is "
        f"{cell(read.row('c_res_window_type', {**cond, 'layers': 'window'}))} in the window layers "
        f"and {cell(read.row('c_res_window_type', {**cond, 'layers': 'global'}))} in the global "
        "layers (C_res: the square root of the signed split-half signal, clamped once); their "
        f"signed difference (C_res², window − global) is {verdict(diff)}, paired bootstrap "
        f"over sequences. Probe R² at positions ≥ {w} (last "
        f"layer): {cell(read.row('probe_tail_r2_log', cond, layer=read.summary_last()))}. "
        f"Analysis time {s['seconds'] / 60:.1f} min.",
        "",
    ]


QUANT_ROWS = (  # (label, metric, condition, at the last residual site)
    ("probe R² (log target, last layer)", "probe_r2_log", None, True),
    ("C² at early queries, layers ≥ 1, content keys", "c_res_content", None, False),
    (
        "removed by BOS → mean, content keys",
        "bos_swap_removed_share",
        {"swap": "mean", "part": "content"},
        False,
    ),
    (
        "loss change, key-0 knockout",
        "knockout_loss_change",
        {"key": 0, "heads": "all", "targets": "all"},
        False,
    ),
    (
        "loss change, key 0 minus random-key control",
        "knockout_loss_change",
        {"key": EXCESS, "heads": "all", "targets": "all"},
        False,
    ),
)


def quantisation_section(reads: dict[str, Read], run: Path) -> list[str]:
    f32, q4 = reads["F32"], reads["Q4_0"]
    rows = []
    for label, metric, condition, last in QUANT_ROWS:
        a, b = (r.row(metric, condition, r.summary_last() if last else None) for r in (f32, q4))
        values = (None, None) if a is None or b is None else (a["value"], b["value"])
        moved = None if None in values else values[1] - values[0]
        inside = (
            "–"
            if moved is None or a.get("lo") is None
            else ("yes" if a["lo"] <= b["value"] <= a["hi"] else "no")
        )
        rows.append([label, cell(a), cell(b), number(moved, 3), inside])
    alpha = [results.value(r.summary, "alpha0_max") for r in (f32, q4)]
    return [
        "## Quantisation: what Q4 alone moves",
        "",
        f"Our run `{run.name}` written as GGUF at F32 and at Q4_0 (`posleak export --format "
        f"gguf`), both read through transformers' GGUF loader and analysed alike "
        f"({f32.opts.seqs} sequences of {f32.summary['seq_len']} tokens, the same sequences):",
        "",
        *table(["measurement", "F32", "Q4_0", "Q4_0 − F32", "Q4_0 inside F32's interval"], rows),
        "",
        f"The strongest head's α₀: {number(alpha[0], 3)} (F32), {number(alpha[1], 3)} (Q4_0).",
        "",
    ]


def write_report(
    models: dict[str, dict[str, AnalysisDir]], quantised: dict | None, run, out: Path
) -> Path:
    """The report, one Markdown file (docs/pretrained-study.md): every sentence from the
    records. Its link to the definitions assumes the command runs in the repository."""
    safe_dir(out.parent, "report folder")
    science = os.path.relpath(Path("docs") / "science.md", out.parent)
    head = [
        "# The three claims inside pretrained models",
        "",
        "Generated by `posleak pretrained-study` (definitions version "
        f"{DEFINITIONS}, [docs/science.md]({science})). Every interval is a 95% bootstrap "
        "over the analysed sequences: these are contrasts inside one checkpoint, with no "
        "second seed to pair with.",
    ]
    body = []
    for name, folders in models.items():
        body += model_section(name, {k: Read(f) for k, f in folders.items()})
    if quantised:
        body += quantisation_section({k: Read(f) for k, f in quantised.items()}, Path(run))
    return write_markdown(out, head, [], body)  # no seeds: no verdict families
