"""Claim (b)'s cells, shared by the text, sink and pretrained studies: the share of the
residual component a BOS replacement removes, by seed, with broken models left out and
counted, and the intact signal (beside its floor) that a share divides."""

from __future__ import annotations

from posleak.analysis.engine.options import Options
from posleak.analysis.reports.study import Study, headline, level, per_seed
from posleak.analysis.stages.bos_swap import PASSES, in_family

BROKEN_NATS = 1.0  # a replacement that raises the early-query loss more than this broke the model
PARTS_V4 = (("content", "content keys j ≥ 1"), ("key0", "key 0 against them"))


def removed_by_seed(
    summaries: list[dict], kind: str, part: str, how: str = "whole"
) -> tuple[dict, int]:
    """{seed: removed share} of one pass of a replacement's family (bos_swap.PASSES), leaving
    out the seeds whose early-query loss rose by more than BROKEN_NATS (a broken model's share
    is not position removed), and how many were left out."""
    swap = PASSES[how]
    share = headline(swap.share, swap=kind, part=part, **swap.condition)
    loss = headline(swap.loss, swap=kind, queries="early", **swap.condition)
    kept = {s["seed"]: share(s) for s in summaries if (loss(s) or 0.0) <= BROKEN_NATS}
    return kept, len(summaries) - len(kept)


def share_cell(summaries: list[dict], kind: str, part: str, how: str = "whole") -> str:
    values, broken = removed_by_seed(summaries, kind, part, how)
    text = level(values, percent=True) if values else "–"
    return text + (f"; model broken in {broken} of {len(summaries)} seeds" if broken else "")


def family_sentence(opts: Options) -> str:
    """What the swap family's rows are, for the replacements that have them (else "")."""
    kinds = in_family(opts)
    if not kinds:
        return ""
    return (
        f"For {', '.join(f'BOS → {kind}' for kind in kinds)} the swap family follows "
        "(descriptive, outside the verdicts): only BOS's key, or only its value, replaced in "
        "every layer by the one the replaced embedding gives (which route a removal takes; the "
        "two together are the whole replacement), "
        "and the position control, the same embedding written at a random position 1 ≤ p ≤ "
        f"{opts.early_queries // 2} of each sequence instead of at 0 (a share as large there "
        "says that replacing any early token does it, not replacing BOS). "
    )


def swap_passes(opts: Options) -> list[tuple[str, str]]:
    """(replacement, pass) of every pass the analyses made, the whole replacements first."""
    whole = [(kind, "whole") for kind in opts.swaps]
    return whole + [(kind, how) for kind in in_family(opts) for how in PASSES if how != "whole"]


def intact_signal_rows(study: Study, variants: list[str]) -> list[list[str]]:
    """What a removed share divides: each part's intact early-query signal (signed C², local
    fit, layers >= 1) beside the floor of both halves' sign flips, one column per variant."""
    rows = []
    for part, label in PARTS_V4:
        for name_, name in (
            (f"c_res_{part}", f"intact C², {label}"),
            (f"c_res_{part}_floor", "its no-signal floor"),
        ):
            number_of = headline(name_)
            rows.append([name, *(level(per_seed(study.runs_of(v), number_of)) for v in variants)])
    return rows


def signal_over_floor(study: Study, variant: str) -> str:
    """The content-key signal a removed share divides, as a multiple of its no-signal floor:
    near 1 the share is a ratio of noise, whatever its sign."""
    signal, floor = headline("c_res_content"), headline("c_res_content_floor")
    ratios = [
        signal(s) / floor(s)
        for s in study.runs_of(variant)
        if signal(s) is not None and floor(s) and floor(s) > 0
    ]
    if not ratios:
        return ""
    spread = f" ({min(ratios):.1f}–{max(ratios):.1f} over {len(ratios)} seeds)"
    return (
        f" The content-key signal this share divides is {sum(ratios) / len(ratios):.1f}× its "
        f"no-signal floor in `{variant}`{spread if len(ratios) > 1 else ''}; where that ratio "
        "is near 1 a removed share is a ratio of noise, whatever its sign."
    )
