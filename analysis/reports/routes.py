"""What each intervention on key 0 removes, trained beside step 0 on the same seed (v4 §7):
the knockouts, the write route, the mass route and the value ablation, in the text and sink
studies alike."""

from __future__ import annotations

from posleak.analysis.maths.seeds import paired_difference
from posleak.analysis.reports.study import STEP0, Study, headline, level, per_seed
from posleak.report import number, table

INTERVENTIONS = (  # (label, the refit R² after it, the loss change it costs or None)
    ("key-0 knockout", headline("knockout_probe_refit_r2_log_last"),
     headline("knockout_loss_change", key=0, heads="all")),
    ("key-1 knockout (control)", headline("knockout_probe_refit_r2_log_key1_last"), None),
    *((label, headline("route2_r2_left_last", rule=rule),
       headline("route_loss_change", rule=rule, queries="early"))
      for rule, label in (("write", "write route"), ("mass", "mass route"),
                          ("value", "value ablation"))),
)  # fmt: skip


def intervention_routes(study: Study, variants: list[str]) -> list[str]:
    """Version 4, item 7: what each intervention on key 0 takes from the refit probe (intact
    minus after, last layer), trained and at step 0 on the same seed, and what training added
    (trained − step 0, paired); with the loss it costs the trained model. Every seed of the
    variants is analysed at step 0 (RUN/analysis-step0)."""
    runs = [s for v in variants for s in study.runs_of(v)]
    study.prefetch([(s, STEP0, study.at_step(s, 0)) for s in runs])
    intact = headline("probe_r2_log_last")

    def drops(v: str, after, at_init: bool) -> dict:
        out = {}
        for s in study.runs_of(v):
            at = study.extra(s, STEP0, study.at_step(s, 0)) if at_init else s
            a, b = intact(at), after(at)
            out[s["seed"]] = None if a is None or b is None else a - b
        return out

    rows, said = [], []
    for v in variants:
        for label, after, loss in INTERVENTIONS:
            trained, initial = drops(v, after, False), drops(v, after, True)
            learned = paired_difference(trained, initial)
            if label == "key-0 knockout" and learned is not None and v in said_of(study):
                said.append(
                    f"in `{v}` the key-0 knockout removes {level(initial)} of the refit R² at "
                    f"step 0 and {level(trained)} trained (trained − step 0: "
                    f"{number(learned.mean, 3)} [{number(learned.lo, 3)}, "
                    f"{number(learned.hi, 3)}])"
                )
            rows.append([
                f"`{v}`", label, level(trained), level(initial),
                "–" if learned is None else level(dict(enumerate(learned.diffs))),
                "–" if loss is None else level(per_seed(study.runs_of(v), loss)),
            ])  # fmt: skip
    k = study.opts.early_queries
    return [
        "### Which route carries position from key 0, and is it learned?",
        "",
        "The refit probe's R² (log target, last layer) lost to each intervention in every head "
        "of every layer (intact minus after: the position it removes), trained and at step 0 "
        "on the same seed, and what training added (trained − step 0, paired by seed); the "
        "trained model's loss change at queries 1–"
        f"{k - 1} (the key-0 knockout: at every query, on the non-copy targets where the corpus "
        "marks copies). The write "
        "route flattens A_i0 to its mean over the queries (key 0's value arrives with a "
        "constant gain), the mass route also "
        "rescales the other keys to keep each row's total (neither key 0's write nor its "
        "dilution of the content keys depends on i), the value ablation puts the mean content "
        "value at position 0. Means over seeds with 95% t-intervals; descriptive (no family).",
        "",
        *table(
            [
                "variant",
                "intervention",
                "R² removed, trained",
                "at step 0",
                "trained − step 0",
                "loss change (nats)",
            ],
            rows,
        ),
        "",
        "Read against step 0: "
        + "; ".join(said)
        + ". What an intervention removes at step 0 is the mask diluting BOS's value as "
        "1/(i + 1) before any learning; only the trained − step 0 column is what a model "
        "learned to route through key 0.",
    ]


def said_of(study: Study) -> list[str]:
    """The variants whose key-0 knockout the text below the table reads: the reference, and
    NoPE where the sweep has it."""
    return [v for v in (study.reference, "nope") if v in study.summaries]
