"""What an intervention removes: shared by the BOS replacement and the key-0 knockout."""

from __future__ import annotations

from posleak.analysis import measures
from posleak.analysis.logits import early_sum, pooled
from posleak.analysis.stats import percentile_interval


def record_removal(analysis, prefix: str, label: str, base, other) -> None:
    """1 - sum C_other(i)^2 / sum C(i)^2 over 1 <= i < k, per layer, with a paired bootstrap
    interval (the same resampled blocks in both passes); and the same for C_mask."""
    add = analysis.rec.add
    for l, (st, ot) in enumerate(zip(base.logits, other.logits, strict=True)):
        for k in (*[k for k in analysis.opts.early_k if k <= analysis.T], None):
            cond = f"{label},k={k or 'all'}"
            orig, new = early_sum(pooled(st.signal), k), early_sum(pooled(ot.signal), k)
            boot = 1 - early_sum(pooled(ot.signal_boot), k) / early_sum(pooled(st.signal_boot), k)
            lo, hi = percentile_interval(boot)
            removed = measures.removed_fraction(new, orig)
            add(f"{prefix}_removed", removed, layer=l, condition=cond, lo=lo, hi=hi)
            cm = [t.c_mask.mean(0)[1:k].pow(2) for t in (st, ot)]
            removed_mask = measures.removed_fraction(cm[1], cm[0])
            add(f"{prefix}_removed_c_mask", removed_mask, layer=l, condition=cond)
