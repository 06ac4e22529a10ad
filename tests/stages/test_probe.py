"""The position probe stage (analysis/stages/probe.py)."""

import torch
from conftest import collect, keep, tiny_model, uniform_tokens

from posleak.analysis.maths import probe


def test_probe_decodes_a_learned_table_and_not_position_free_embeddings():
    tokens = uniform_tokens(n=64, T=32)
    learned = tiny_model(position="learned", d_model=64)
    with torch.no_grad():
        learned.pos_embed.weight.mul_(50)  # a table that dominates the token embedding
    positions = torch.arange(1, 32)
    groups = torch.arange(32).repeat_interleave(31)
    for model, low, high in ((learned, 0.95, 1.01), (tiny_model(position="rope"), -0.05, 0.05)):
        x = collect(model, tokens, {"blocks.0.resid_pre": keep})["blocks.0.resid_pre"][:, 1:]
        p = probe.fit(x[0::2].reshape(-1, x.shape[-1]), positions.repeat(32), groups, "log")
        r2 = probe.score(p, x[1::2], positions).r2
        assert low < r2 < high, (model.cfg.position, r2)
