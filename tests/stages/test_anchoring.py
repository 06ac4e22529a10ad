"""Anchoring (analysis/stages/anchoring.py): BOS at position k, the lift on key k beside the
lift on key 0. The lift is checked against closed forms, and two planted one-head models tell
a sink anchored to the BOS token (it follows BOS to key k) from one anchored to position 0 (it
stays on key 0 whatever token is there)."""

import pytest
import torch
from conftest import blank_one_head_model

from posleak.analysis.engine.analyze import Analysis, Options
from posleak.analysis.engine.collect import Subject
from posleak.analysis.maths import measures
from posleak.analysis.stages import stage
from posleak.analysis.stages.anchoring import bos_at
from posleak.model.masks import attention_mask

V, D, BOS, T = 13, 8, 10, 32


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("key", [0, 4, 16])
def test_uniform_attention_lifts_every_key_to_one_and_a_planted_share_reads_its_closed_form(
    window, key
):
    visible = attention_mask(T, window)
    uniform = visible.double() / visible.sum(-1, keepdim=True)  # (T, T)
    column = uniform[None, None, :, key].expand(3, 2, T)
    assert measures.key_lift(column, key, window).allclose(torch.ones(3, 2, dtype=torch.float64))
    share = 0.7  # every query that sees `key` gives it 70% of its attention
    planted = torch.where(visible[:, key], share, uniform[:, key])[None, None].expand(3, 2, T)
    i = torch.arange(T)
    sees = (i > key) & visible[:, key]
    n = visible.sum(-1).double()
    expected = (n[sees] * share).mean()
    assert measures.key_lift(planted, key, window)[0, 0].item() == pytest.approx(expected.item())
    assert measures.key_lift(uniform[None, None, :, 0].expand(1, 1, T), 0, window).item() == 1.0


def test_bos_goes_to_position_k_after_k_ordinary_tokens():
    ordinary = torch.arange(20).reshape(2, 10)
    moved = bos_at(ordinary, 99, 4)
    assert moved.shape == (2, 10) and (moved[:, 4] == 99).all()
    assert torch.equal(moved[:, :4], ordinary[:, :4]) and torch.equal(
        moved[:, 5:], ordinary[:, 4:9]
    )


def planted(anchor: str) -> Subject:
    """One NoPE (token) or learned-position (position) head whose queries all score one key
    high: the BOS token's key, or whatever sits at position 0."""
    position = "nope" if anchor == "token" else "learned"
    model = blank_one_head_model(vocab_size=V, d_model=D, position=position, max_seq_len=T)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer = model.layers[0]
        emb = torch.zeros(V, D)
        emb[:, 1] = 1.0
        emb[:, 2:] = 0.3 * torch.randn(V, D - 2, generator=gen)
        if anchor == "token":
            emb[BOS, 0] = 3.0
        else:
            model.pos_embed.weight[0, 0] = 3.0
        model.embed_tokens.weight.copy_(emb)
        layer.self_attn.q_proj.weight[2, 1] = 3.0
        layer.self_attn.k_proj.weight[2, 0] = 3.0

    def draw(n, seq_len, bos, stream):
        body = torch.randint(0, BOS, (n, seq_len + 1), generator=torch.Generator().manual_seed(1))
        if bos == "always":
            body[:, 0] = BOS
        return body

    return Subject(model.eval(), anchor, {"variant": anchor, "seed": 0}, T, "always", 0,
                   "planted", draw, {})  # fmt: skip


@pytest.mark.parametrize("anchor", ["token", "position"])
def test_a_token_anchored_sink_follows_bos_and_a_position_anchored_one_stays(anchor):
    opts = Options(seqs=4, anchor_positions=(0, 4, 16), anchor_seqs=8)
    analysis = Analysis(planted(anchor), opts)
    stage("anchoring").run(analysis, None)
    lift = {
        (r["condition"]["k"], r["condition"]["key"]): r["value"]
        for r in analysis.rec.rows
        if r["metric"] == "anchor_lift"
    }
    assert lift[0, "bos"] == lift[0, "start"] > 5  # a sink on key 0, BOS there
    for k in (4, 16):
        if anchor == "token":
            assert lift[k, "bos"] > 5 and lift[k, "start"] < 1.5, lift
        else:
            assert lift[k, "start"] > 5 and lift[k, "bos"] < 1.5, lift
