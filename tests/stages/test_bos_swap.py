"""The BOS swap family (docs/science.md, measurement 6): BOS's key only, its value only, and
the position control, checked against what the forward pass itself computes."""

import dataclasses

import pytest
import torch
from conftest import (
    SMALL,
    collect,
    keep,
    tiny_overrides,
)

from posleak.analysis.engine.analyze import Options, analysis_of
from posleak.analysis.stages import NUMBERS
from posleak.analysis.stages.bos_swap import (
    control_positions,
    embedding_at,
    position0_states,
    replacement,
    route_hooks,
)
from posleak.model import Decoder, ModelConfig
from posleak.train.config import build
from posleak.train.loop import train

L = 3


def model_and_tokens(position="rope"):
    torch.manual_seed(0)
    model = Decoder(
        ModelConfig(vocab_size=23, n_layer=L, n_head=2, d_model=16, position=position)
    ).eval()
    tokens = torch.randint(0, 23, (7, 12), generator=torch.Generator().manual_seed(1))
    return model, tokens


def states(model, tokens, hooks, names):
    return collect(model, tokens, {n: keep for n in names}, batch_size=3, interventions=hooks)


@pytest.mark.parametrize("position", ["rope", "nope"])
def test_bos_key_and_value_in_every_layer_reproduce_the_whole_replacement(position):
    """Later positions read position 0 only through its key and value, so putting the
    replaced embedding's key and value in every layer must give the whole replacement's
    states at every position >= 1; the donor comes from a one-token pass."""
    model, tokens = model_and_tokens(position)
    vector = torch.randn(16, generator=torch.Generator().manual_seed(2))
    names = [f"blocks.{l}.resid_post" for l in range(L)]
    kv = [f"blocks.{l}.attn.{x}" for l in range(L) for x in "kv"]
    whole = states(model, tokens, [("embed", embedding_at(vector, None))], names + kv)
    donor = position0_states(model, vector, L)
    for name in kv:  # the one-token pass gives what the full pass has at position 0
        assert torch.allclose(donor[name].expand(7, -1, -1), whole[name][:, :, 0], atol=1e-5)
    both = route_hooks(donor, "key", range(L)) + route_hooks(donor, "value", range(L))
    routed = states(model, tokens, both, names)
    intact = states(model, tokens, [], names)
    for name in names:
        assert torch.allclose(routed[name][:, 1:], whole[name][:, 1:], atol=1e-5)
        assert not torch.allclose(intact[name][:, 1:], whole[name][:, 1:], atol=1e-3)


def test_the_key_route_changes_bos_key_and_nothing_of_position_0_itself():
    model, tokens = model_and_tokens()
    vector = torch.randn(16, generator=torch.Generator().manual_seed(3))
    names = [f"blocks.{l}.attn.{x}" for l in range(L) for x in "kv"]
    donor = position0_states(model, vector, L)
    intact = states(model, tokens, [], names)
    keyed = states(model, tokens, route_hooks(donor, "key", range(L)), names)
    for l in range(L):
        k, v = f"blocks.{l}.attn.k", f"blocks.{l}.attn.v"
        # position 0 attends only to itself: its own states, hence its value, do not move
        assert torch.allclose(keyed[v][:, :, 0], intact[v][:, :, 0], atol=1e-6)
        assert torch.allclose(keyed[k][:, :, 0], donor[k].expand(7, -1, -1), atol=1e-6)
    assert not torch.allclose(
        keyed["blocks.2.attn.v"][:, :, 1:], intact["blocks.2.attn.v"][:, :, 1:]
    )


def test_the_position_control_writes_each_sequence_at_its_own_position():
    model, tokens = model_and_tokens()
    vector = torch.full((16,), 0.5)
    at = control_positions(len(tokens), 8, seed=0)
    assert torch.equal(at, control_positions(len(tokens), 8, seed=0))  # seeded
    assert int(at.min()) >= 1 and int(at.max()) <= 4  # 1 <= p <= early / 2
    moved = states(model, tokens, [("embed", embedding_at(vector, at))], ["embed"])["embed"]
    intact = states(model, tokens, [], ["embed"])["embed"]
    for r, p in enumerate(at.tolist()):
        assert torch.equal(moved[r, p], vector)
        others = [j for j in range(tokens.shape[1]) if j != p]
        assert torch.equal(moved[r, others], intact[r, others])
    with pytest.raises(RuntimeError, match="more sequences than the 6 positions"):
        states(model, tokens, [("embed", embedding_at(vector, at[:6]))], ["embed"])


def test_an_analysis_reports_the_swap_family_for_the_replacements_that_ask_for_it(tmp_path):
    train(build(tiny_overrides(train__steps=6)), tmp_path / "run")
    opts = Options(
        seqs=16, early_k=(4, 8), batch_size=8, bootstrap=20, swaps=("mean", "zeros"),
        swap_family=("zeros",), stages=("bos_swap",),
    )  # fmt: skip
    analysis = analysis_of(tmp_path / "run", opts)
    rows, summary = analysis.run_all()
    headline = summary["headline"]
    for part in ("content", "key0"):
        for route in ("key", "value"):
            key = NUMBERS["bos_swap_route_removed_share"].key(swap="zeros", route=route, part=part)
            assert key in headline
        assert NUMBERS["bos_swap_control_removed_share"].key(swap="zeros", part=part) in headline
        assert NUMBERS["bos_swap_control_removed_share"].key(swap="mean", part=part) not in headline
    loss = NUMBERS["bos_swap_control_loss_change"].key(swap="zeros", queries="early")
    assert headline[loss] is not None and headline[loss] > 0  # a token lost costs loss
    routed = {
        r["condition"].get("route")
        for r in rows
        if r["metric"] == "bos_swap_loss_change" and r["condition"]["swap"] == "zeros"
    }
    assert routed == {None, "key", "value"}
    assert not [r for r in rows if r["condition"] and r["condition"].get("swap") == "mean"
                and ("route" in r["condition"] or "at" in r["condition"])]  # fmt: skip


def test_an_analysis_stored_before_the_swap_family_reads_as_made_without_it():
    """...where it ran the BOS replacements; one that did not is as current as it was."""
    stored = dataclasses.asdict(Options())
    del stored["swap_family"]
    swapped = {"options": stored, "stages": ["probes", "BOS replacements"]}
    assert Options.of_summary(swapped).swap_family == ()
    assert Options.of_summary({"options": stored, "stages": ["probes", "bands"]}) == Options()
    assert Options.of_summary({"options": dataclasses.asdict(Options())}) == Options()


def test_bos_replacements_change_only_position_zero_and_follow_their_definitions(runs):
    analysis = analysis_of(runs / "rope-s0", SMALL)
    tokens = analysis.tokens(16, analysis.T, "analysis")[:, : analysis.T]
    table = analysis.model.embed_tokens.weight.detach()
    for kind in SMALL.swaps:
        vector = replacement(analysis, kind, tokens)

        def swap(embed, name, vector=vector):
            embed = embed.clone()
            embed[:, 0] = vector
            return embed

        orig = collect(analysis.model, tokens, {"embed": keep})["embed"]
        new = collect(analysis.model, tokens, {"embed": keep}, interventions=[("embed", swap)])
        assert torch.equal(orig[:, 1:], new["embed"][:, 1:])
        assert torch.equal(new["embed"][:, 0], vector.expand_as(new["embed"][:, 0]))
    counts: dict = {}
    for t in tokens[:, 1:].flatten().tolist():
        counts[t] = counts.get(t, 0) + 1
    by_hand = sum(c * table[t] for t, c in counts.items()) / sum(counts.values())
    assert torch.allclose(replacement(analysis, "mean", tokens), by_hand, atol=1e-6)
    most = max(counts, key=counts.get)
    assert torch.equal(replacement(analysis, "token", tokens), table[most])
    assert replacement(analysis, "random", tokens).norm().item() == pytest.approx(
        table[tokens[0, 0]].norm().item()
    )


def test_mean_replacement_has_the_norm_of_an_ordinary_token_on_real_text(tmp_path):
    cfg = build(
        tiny_overrides(data__source="bible", model__d_model=32, train__steps=40, train__lr=1e-2)
    )
    train(cfg, tmp_path / "bible")
    analysis = analysis_of(tmp_path / "bible", Options(seqs=16))
    tokens = analysis.tokens(16, analysis.T, "analysis")[:, : analysis.T]
    table = analysis.model.embed_tokens.weight.detach()
    present = tokens[:, 1:].unique()
    typical = table[present].norm(dim=1).median().item()
    mean_norm = replacement(analysis, "mean", tokens).norm().item()
    uniform_norm = table[:256].mean(0).norm().item()  # v1's average of every byte row
    assert mean_norm > 0.3 * typical
    assert mean_norm > 3 * uniform_norm
