"""What an intervention removes, and the position a probe still finds after it: shared by the
BOS replacement, the knockouts, the route-2 test and NTK at inference."""

from __future__ import annotations

import torch

from posleak.analysis.maths import content, measures
from posleak.analysis.maths.logits import PARTS, early_sum, local_fit, parts, pooled
from posleak.analysis.maths.stats import percentile_interval


def record_removal(analysis, prefix: str, label: dict, base, other) -> None:
    """Version 2's removed share per layer (1 - sum C_other(i)^2 / sum C(i)^2 over 1 <= i < k,
    each query clamped; kept for comparison) with a paired bootstrap interval, the same for
    C_mask, and version 3's removed share per part pooled over layers >= 1."""
    add = analysis.rec.add
    for l, (st, ot) in enumerate(zip(base.logits, other.logits, strict=True)):
        for k in (*[k for k in analysis.opts.early_k if k <= analysis.T], None):
            cond = {**label, "k": k or "all"}
            orig, new = early_sum(pooled(st.signal), k), early_sum(pooled(ot.signal), k)
            boot = 1 - early_sum(pooled(ot.signal_boot), k) / early_sum(pooled(st.signal_boot), k)
            lo, hi = percentile_interval(boot)
            removed = measures.removed_fraction(new, orig)
            add(f"{prefix}_removed", removed, layer=l, condition=cond, lo=lo, hi=hi)
            cm = [t.c_mask.mean(0)[1:k].pow(2) for t in (st, ot)]
            removed_mask = measures.removed_fraction(cm[1], cm[0])
            add(f"{prefix}_removed_c_mask", removed_mask, layer=l, condition=cond)
    record_removal_v3(analysis, prefix, label, base, other)


def record_removal_v3(analysis, prefix: str, label: dict, base, other) -> None:
    """Version 3, items 1-3, of one intervention (see removed_shares), recorded per part with
    its paired bootstrap interval."""
    if analysis.L < 2:
        return
    k = min(analysis.opts.early_queries, analysis.T)
    local = [
        (local_fit(analysis, base.sums[l]), local_fit(analysis, other.sums[l]))
        for l in range(1, analysis.L)
    ]
    for part, (value, boot) in removed_shares(local, k).items():
        lo, hi = percentile_interval(boot)
        cond = {**label, "part": part}
        analysis.rec.add(
            f"{prefix}_removed_v3", value, condition=cond, lo=lo, hi=hi, n=analysis.opts.seqs
        )
    record_removal_v4(analysis, prefix, label, base, other)


def record_removal_v4(analysis, prefix: str, label: dict, base, other) -> None:
    """Version 4's removed share of one intervention, per part (the content keys from a fit on
    keys j >= 1, key 0 read against it), over layers >= 1 and the early queries, divided once,
    with a paired bootstrap interval."""
    k = min(analysis.opts.early_queries, analysis.T)
    splits = [
        (content.local_split(analysis, base.sums[l]), content.local_split(analysis, other.sums[l]))
        for l in range(1, analysis.L)
    ]
    for part in content.PARTS:
        share = content.removed_share(splits, part, k)
        analysis.rec.add(
            f"{prefix}_removed_share",
            share.value,
            condition={**label, "part": part},
            lo=share.lo,
            hi=share.hi,
            n=analysis.opts.seqs,
        )


def removed_shares(layers: list[tuple], k: int) -> dict:
    """{part: (removed, bootstrap replicates)} for all keys, key 0 and keys j >= 1: 1 - S_other
    / S_base, S the signed split-half signal summed over queries 1 <= i < k and over the given
    (base, other) LogitStats pairs (layers >= 1: layer 0's key-0 logit moves with the
    embedding by construction), divided once. The same resampled blocks in both passes make
    the bootstrap paired. A part whose base sum is not positive has nothing to remove: left
    out."""
    sums = {part: [0.0, 0.0, 0.0, 0.0] for part in PARTS}  # base, other, and their replicates
    for base, other in layers:
        b, o = parts(base), parts(other)
        for part, acc in sums.items():
            acc[0] += b[part][0][1:k].sum()
            acc[1] += o[part][0][1:k].sum()
            acc[2] += b[part][1][:, 1:k].sum(-1)
            acc[3] += o[part][1][:, 1:k].sum(-1)
    out = {}
    for part, (orig, new, orig_boot, new_boot) in sums.items():
        if float(orig) > 0:
            boot = torch.where(orig_boot > 0, 1 - new_boot / orig_boot, torch.nan)
            out[part] = (float(1 - new / orig), boot)
    return out


def record_probes(analysis, prefix: str, label: dict, done) -> None:
    """Per residual site, the base probe's transfer R^2 on the intervened states
    (`PREFIX_probe_r2_log`) and the R^2 of a probe refit on them (`PREFIX_probe_refit_r2_log`:
    the position information left)."""
    for site, (r2, refit) in enumerate(
        zip(done.probe_r2_log, done.probe_refit_r2_log, strict=True)
    ):
        analysis.rec.add(f"{prefix}_probe_r2_log", r2, layer=site, condition=label)
        analysis.rec.add(f"{prefix}_probe_refit_r2_log", refit, layer=site, condition=label)
