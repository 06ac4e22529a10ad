"""The shift test (analysis/stages/shift.py)."""

import torch
from conftest import collect, keep, tiny_model, uniform_tokens


def test_shift_test_is_zero_for_a_rope_layer_that_reads_only_relative_offsets():
    model = tiny_model(position="rope", n_layer=1)
    n, delta = 10, 13
    content = uniform_tokens(n=4, T=1 + n)
    filler = uniform_tokens(n=1, T=delta, seed=5).expand(4, -1)
    far = torch.cat([content[:, :1], filler, content[:, 1:]], dim=1)
    p = {}
    for name, toks in (("near", content), ("far", far)):
        p[name] = collect(model, toks, {"blocks.0.attn.pattern": keep})["blocks.0.attn.pattern"]
    from posleak.analysis.maths.measures import shift_distances

    assert shift_distances(p["near"], p["far"], 1, 1 + delta, n).max() < 1e-3
