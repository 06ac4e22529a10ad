"""What the key-0 knockout does to the loss (analysis/stages/knockout_loss.py)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SMALL,
    blank_one_head_model,
)

from posleak.analysis.maths import measures
from posleak.analysis.stages import stage
from posleak.analysis.stages.knockout_loss import EXCESS


# ------------------------------------------------------------------ knockout loss (v3 item 7)
def planted_sink_subject(gain: float, T: int = 24, n: int = 16):
    """A one-head NoPE layer whose only non-zero value is BOS's and whose queries all score
    BOS high: A_i0 = e^{s_i} / (e^{s_i} + i) and the head adds A_i0 * gain * n_0 e_4, in
    closed form (no MLP). Returns the subject and the closed-form mean loss change of each
    knockout rule, over all targets and over the targets the planted copy mask marks."""
    from posleak.analysis.engine.collect import Subject

    V, d, bos = 13, 8, 10
    model = blank_one_head_model(vocab_size=V, d_model=d, position="nope")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer = model.layers[0]
        emb = torch.zeros(V, d)
        emb[:bos, 1] = 1.0
        emb[:bos, 2:] = 0.5 * torch.randn(bos, d - 2, generator=gen)
        emb[bos, 0] = 3.0
        model.embed_tokens.weight.copy_(emb)
        attn = layer.self_attn
        attn.q_proj.weight[2, 1] = 1.6
        attn.k_proj.weight[2, 0] = 1.6
        attn.v_proj.weight[3, 0] = 1.0
        attn.o_proj.weight[4, 3] = gain
        unembed = torch.randn(V, d, generator=gen)
        unembed[:, 4] = 0.0
        unembed[bos:, 4] = -3.0  # the sink's output lowers the specials: it helps every target
        model.lm_head.weight.copy_(unembed)
    body = torch.randint(0, bos, (n, T + 1), generator=gen)
    tokens = torch.cat([torch.full((n, 1), bos), body[:, 1:]], dim=1)  # (n, T + 1)
    marked = lambda t: (t % 2 == 0) & (t < bos)  # noqa: E731  a stand-in copy mask

    def rms(x):
        return x / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()

    x = emb.double()[tokens[:, :T]]  # (n, T, d)
    normed = rms(x)
    score = (1.6 * normed[..., 1]) * (1.6 * normed[:, :1, 0]) / math.sqrt(d)  # s_i0
    i = torch.arange(T, dtype=torch.float64)
    a0 = torch.exp(score) / (torch.exp(score) + i)  # ordinary keys score 0
    a0[:, 0] = 1.0
    keys = measures.random_earlier_keys(T, None, 0)

    def loss(a):
        out = x.clone()
        out[..., 4] += a * gain * normed[:, :1, 0]
        logits = rms(out) @ model.lm_head.weight.double().T
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")

    base = loss(a0).view(n, T)
    other = 1.0 / (torch.exp(score) + i)  # the weight of any one ordinary key
    knocked = {"key=0": torch.where(i >= 1, 0.0, a0)}
    knocked["key=1"] = torch.where(i > 1, a0 / (1 - other), a0)
    knocked["key=random"] = torch.where(i >= 1, a0 / (1 - other), a0)  # an ordinary key
    mask = torch.from_numpy(marked(tokens.numpy())[:, 1:])
    expected = {}
    for label, a in knocked.items():
        change = loss(a).view(n, T) - base
        expected[label, "all"] = change.mean().item()
        expected[label, "copy"] = change[mask].mean().item()
        expected[label, "other"] = change[~mask].mean().item()
    subject = Subject(
        model=model.eval(),
        name="planted",
        label={"variant": "planted", "seed": 0},
        train_len=T,
        bos="always",
        seed=0,
        data="planted",
        draw=lambda k, L, b, s: tokens[:k, : L + 1],
        info={},
        copy_targets=lambda t: marked(t),
    )
    assert keys.min() >= 0
    return subject, expected


KEY_OF = {"key=0": 0, "key=1": 1, "key=random": "random"}  # the closed form's labels


@pytest.mark.parametrize("gain", [0.0, 4.0])
def test_knockout_loss_recovers_a_planted_sinks_closed_form_and_zero_without_one(gain):
    from posleak.analysis.engine.analyze import Analysis

    subject, expected = planted_sink_subject(gain)
    analysis = Analysis(subject, dataclasses.replace(SMALL, seqs=16))
    ctx = analysis.context(analysis.tokens(16, analysis.T, "analysis"))
    stage("probes").run(analysis, ctx)
    stage("key-0 knockout").run(analysis, ctx)  # its every-layer passes carry the losses
    stage("knockout loss").run(analysis, ctx)
    got = {
        tuple(r["condition"][f] for f in ("key", "heads", "targets")): r
        for r in analysis.rec.rows
        if r["metric"] == "knockout_loss_change"
    }
    (heads,) = [r["value"] for r in analysis.rec.rows if r["metric"] == "knockout_sink_heads"]
    assert heads == 1  # the planted head is a sink: alpha_0 > 0.3 and lambda_0 >= 5
    for (label, group), value in expected.items():
        row = got[KEY_OF[label], "all", group]
        assert row["value"] == pytest.approx(value, abs=2e-5)
        if gain == 0:
            assert value == 0 and abs(row["value"]) < 1e-6  # no value to remove: no change
    if gain:
        assert expected["key=0", "all"] > 0.01  # the planted effect is clear...
        row = got[0, "all", "all"]
        assert row["lo"] > 0  # ...and its interval excludes 0
        excess = got[EXCESS, "all", "all"]["value"]
        assert excess == pytest.approx(
            expected["key=0", "all"] - expected["key=random", "all"], abs=2e-5
        )
    # one layer, one head: the sink-head knockout is the every-layer one
    assert got[0, "sinks", "all"]["value"] == pytest.approx(got[0, "all", "all"]["value"], abs=1e-9)
