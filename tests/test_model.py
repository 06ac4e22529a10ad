"""The decoder against independent references: closed forms, nested loops, float64 maths."""

import itertools
import json
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from posleak.model import ConfigError, Decoder, ModelConfig, decoder
from posleak.model.masks import attention_mask
from posleak.model.rope import (
    apply_rope,
    ntk_base,
    rope_frequencies,
    rope_half_tables,
    rope_tables,
    rotate,
)

VARIANTS = [
    dict(position="nope"),
    dict(position="learned"),
    dict(position="rope"),
    dict(position="rope_ntk", params={"scale": 4.0}),
    dict(position="rope", window=4),
    dict(position="nope", window=3),
    dict(position="rope", sink="learned"),
    dict(position="rope", sink="off_by_one", window=5),
    dict(position="alibi"),
    dict(position="alibi", window=4, sink="learned"),
    dict(position="rope", attention="softpick"),
    dict(position="rope", gate=True),
    dict(position="alibi", attention="softpick", gate=True, window=4),
]


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=37, n_layer=2, n_head=2, d_model=16, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def tokens(batch=2, seq=12, seed=0, vocab=37):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ RoPE maths
def test_frequency_table_equals_closed_form():
    d, base = 16, 10000.0
    expected = [base ** (-2 * p / d) for p in range(d // 2)]
    assert torch.allclose(rope_frequencies(d, base), torch.tensor(expected, dtype=torch.float64))
    cos, _ = rope_tables(5, d, base)
    assert cos[3, 2].item() == pytest.approx(math.cos(3 * expected[2]), abs=1e-7)
    assert cos[3, 2 + d // 2].item() == pytest.approx(math.cos(3 * expected[2]), abs=1e-7)


@pytest.mark.parametrize("d, expected", [(64, 85550.4), (128, 82684.6)])
def test_ntk_base_reference_values(d, expected):
    assert ntk_base(10000.0, 8.0, d) == pytest.approx(expected, abs=0.05)


def test_ntk_keeps_highest_frequency_and_divides_lowest_by_s():
    d, s = 64, 8.0
    plain = rope_frequencies(d, 10000.0)
    scaled = rope_frequencies(d, ntk_base(10000.0, s, d))
    assert scaled[0] == plain[0] == 1.0
    assert (plain[-1] / scaled[-1]).item() == pytest.approx(s, rel=1e-12)


def test_rope_scores_depend_only_on_offset():
    d, T = 16, 40
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    cos, sin = rope_tables(T, d, 10000.0)
    rq = apply_rope(q.expand(T, d), cos, sin)
    rk = apply_rope(k.expand(T, d), cos, sin)
    scores = rq @ rk.T  # scores[i, j] for identical content at every position
    for shift in (1, 7, 20):
        assert torch.allclose(scores[shift:, shift:], scores[:-shift, :-shift], atol=1e-4)


def test_fused_rotation_equals_the_formula_forward_and_backward():
    """`rotate` (half tables, (B, T, H, d) layout, written-out backward) against the textbook
    formula in float64, and its backward against autograd through that formula."""
    B, T, H, d = 2, 24, 3, 16
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, H, d, generator=gen, dtype=torch.float64)
    cos, sin = rope_tables(T, d, 500.0)
    half_cos, half_sin = rope_half_tables(T, d, 500.0)
    assert torch.equal(cos[:, : d // 2], half_cos) and torch.equal(cos[:, d // 2 :], half_cos)
    grad_out = torch.randn(B, H, T, d, generator=gen, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    ref = apply_rope(x_ref.transpose(1, 2), cos.double(), sin.double())
    ref.backward(grad_out)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):  # tables are float32
        x_fast = x.to(dtype).clone().requires_grad_()
        fast = rotate(x_fast, half_cos[:, None], half_sin[:, None]).transpose(1, 2)
        fast.backward(grad_out.to(dtype))
        assert torch.allclose(fast.double(), ref, atol=tol)
        assert torch.allclose(x_fast.grad.double(), x_ref.grad, atol=tol)
    # the backward is the inverse rotation: rotating the output back returns the input
    back = rotate(
        rotate(x, half_cos[:, None], half_sin[:, None]), half_cos[:, None], -half_sin[:, None]
    )
    assert torch.allclose(back, x, atol=1e-6)


def test_model_layer0_rope_scores_are_toeplitz_for_position_free_input():
    model = Decoder(tiny(position="rope", n_layer=1))
    same_token = torch.full((1, 20), 5)
    _, cache = model.run_with_cache(same_token, names=["blocks.0.attn.scores"])
    s = cache["blocks.0.attn.scores"][0, 0]
    for delta in range(20):
        diag = torch.diagonal(s, offset=-delta)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5)


def test_set_rope_scale_one_is_identity_and_other_scales_change_outputs():
    model = Decoder(tiny(position="rope"))
    x = tokens(seq=30)
    before = model(x)
    model.set_rope_scale(1.0)
    assert torch.equal(model(x), before)
    model.set_rope_scale(8.0)
    assert not torch.allclose(model(x), before, atol=1e-5)
    ntk = Decoder(tiny(position="rope_ntk", params={"scale": 8.0}))
    ntk.load_state_dict(model.state_dict())
    assert torch.equal(ntk(x), model(x))
    with pytest.raises(ValueError, match="needs a RoPE model"):
        Decoder(tiny(position="nope")).set_rope_scale(2.0)


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("T, w", [(1, None), (9, None), (9, 1), (9, 3), (9, 9), (9, 20)])
def test_mask_equals_nested_loop(T, w):
    ref = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            ref[i, j] = j <= i and (w is None or i - j < w)
    assert torch.equal(attention_mask(T, w), ref)


@pytest.mark.parametrize("eager", [False, True])
def test_window_at_least_T_is_exactly_full_causal(eager):
    x = tokens(seq=10)
    full, windowed = Decoder(tiny()), Decoder(tiny(window=10))
    full.force_eager = windowed.force_eager = eager
    assert torch.equal(full(x), windowed(x))
    assert not torch.allclose(Decoder(tiny(window=9))(x), full(x), atol=1e-6)


# ------------------------------------------------------------------ causality and position 0
@pytest.mark.parametrize("overrides", VARIANTS)
def test_changing_token_t_never_changes_earlier_logits(overrides):
    model = Decoder(tiny(**overrides))
    x = tokens(batch=1, seq=16)
    t = 9
    y = x.clone()
    y[0, t] = (x[0, t] + 1) % 37
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t], atol=1e-4)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_position0_hidden_states_bit_identical_across_inputs(overrides):
    model = Decoder(tiny(**overrides))
    names = ["embed"] + [f"blocks.{layer}.resid_post" for layer in range(2)] + ["final"]
    states = []
    for seed in range(3):
        x = tokens(batch=1, seq=14, seed=seed)
        x[0, 0] = 7
        _, cache = model.run_with_cache(x, names=names)
        states.append({name: cache[name][0, 0] for name in names})
    for other in states[1:]:
        for name in names:
            assert torch.equal(states[0][name], other[name]), name
    x = tokens(batch=1, seq=14, seed=9)
    x[0, 0] = 8
    _, cache = model.run_with_cache(x, names=names)
    assert not torch.equal(cache["final"][0, 0], states[0]["final"])


@pytest.mark.parametrize("window", [None, 4])
def test_flat_logits_give_uniform_pattern_over_visible_keys(window):
    model = Decoder(tiny(window=window, n_layer=1))
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.zero_()
        model.layers[0].self_attn.k_proj.weight.zero_()
    T = 12
    _, cache = model.run_with_cache(tokens(seq=T), names=["blocks.0.attn.pattern"])
    pattern = cache["blocks.0.attn.pattern"]
    for i in range(T):
        n_visible = i + 1 if window is None else min(i + 1, window)
        expected = torch.zeros(T)
        expected[i - n_visible + 1 : i + 1] = 1.0 / n_visible
        assert torch.equal(pattern[0, 0, i], expected), i


# ------------------------------------------------------------------ sinks
@pytest.mark.parametrize("sink", ["learned", "off_by_one"])
def test_sink_pattern_equals_softmax_over_appended_column(sink):
    model = Decoder(tiny(sink=sink, window=6, n_layer=1))
    attn = model.layers[0].self_attn
    if sink == "learned":
        with torch.no_grad():
            attn.sink_logit.copy_(torch.tensor([1.5, -0.7]))
    T = 10
    _, cache = model.run_with_cache(
        tokens(seq=T), names=["blocks.0.attn.scores", "blocks.0.attn.pattern"]
    )
    scores = cache["blocks.0.attn.scores"].double()
    pattern = cache["blocks.0.attn.pattern"]
    sink_logits = [1.5, -0.7] if sink == "learned" else [0.0, 0.0]
    for b in range(2):
        for h in range(2):
            for i in range(T):
                visible = [j for j in range(T) if j <= i and i - j < 6]
                z = sum(math.exp(scores[b, h, i, j]) for j in visible) + math.exp(sink_logits[h])
                for j in range(T):
                    ref = math.exp(scores[b, h, i, j]) / z if j in visible else 0.0
                    assert pattern[b, h, i, j].item() == pytest.approx(ref, abs=1e-6)


# ------------------------------------------------------------------ attention that need not sink
def test_softpick_equals_its_formula_in_float64_and_survives_large_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 9, 9, generator=gen, dtype=torch.float64) * 3
    scores.masked_fill_(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    for b, h, i in itertools.product(range(3), range(2), range(9)):
        row = [math.exp(scores[b, h, i, j].item()) - 1 for j in range(i + 1)]
        total = sum(abs(x) for x in row) + 1e-6
        ref = [max(x, 0.0) / total for x in row] + [0.0] * (8 - i)
        assert decoder.softpick(scores)[b, h, i].tolist() == pytest.approx(ref, abs=1e-12)
    big = torch.tensor([[800.0, 799.0, -5.0, float("-inf")]])  # e^800 overflows a float64
    e1 = math.exp(-1)  # the formula's limit: (1, e^-1, 0) / (1 + e^-1 + ~0)
    assert decoder.softpick(big)[0].tolist() == pytest.approx([1 / (1 + e1), e1 / (1 + e1), 0, 0])
    assert (
        decoder.softpick(torch.full((1, 3), -4.0)).sum() == 0
    )  # nothing above e^0: attend to nothing


def test_softpick_rows_need_not_sum_to_one_and_refuse_a_sink_logit():
    model = Decoder(tiny(attention="softpick", n_layer=1))
    _, cache = model.run_with_cache(tokens(seq=10), names=["blocks.0.attn.pattern"])
    totals = cache["blocks.0.attn.pattern"].sum(-1)
    assert (totals <= 1 + 1e-6).all() and (totals < 0.999).any()
    with pytest.raises(ConfigError, match='softpick needs none.*set sink = "none"'):
        tiny(attention="softpick", sink="learned")
    with pytest.raises(ConfigError, match="attention must be one of"):
        tiny(attention="sigmoid")


def test_the_gate_scales_each_heads_output_by_a_sigmoid_of_its_query():
    model = Decoder(tiny(gate=True, n_layer=1))
    names = ["blocks.0.attn.pattern", "blocks.0.attn.v", "blocks.0.attn.out"]
    x = tokens(seq=7)
    _, cache = model.run_with_cache(x, names=names)
    attn = model.layers[0].self_attn
    with torch.no_grad():
        inputs = model.layers[0].input_layernorm(model.embed_tokens(x))
        gate = torch.sigmoid(inputs.double() @ attn.gate_proj.weight.double().T
                             + attn.gate_proj.bias.double())  # (B, T, H)  # fmt: skip
        y = cache["blocks.0.attn.pattern"].double() @ cache["blocks.0.attn.v"].double()
        y = (y * gate.transpose(1, 2).unsqueeze(-1)).transpose(1, 2).reshape(2, 7, 16)
        out = y @ attn.o_proj.weight.double().T
    assert torch.allclose(cache["blocks.0.attn.out"].double(), out, atol=1e-6)
    ones = [("blocks.0.attn.gate", lambda g, name: torch.ones_like(g))]
    ungated = Decoder(tiny(n_layer=1))  # every shared parameter starts identically
    with model.hooks(ones):
        assert torch.allclose(model(x), ungated(x), atol=1e-6)


# ------------------------------------------------------------------ ALiBi
def test_alibi_slopes_are_the_papers():
    from posleak.model.positions import alibi_slopes

    assert alibi_slopes(8).tolist() == [2.0 ** (-h) for h in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0 ** (-2 * h) for h in range(1, 5)]
    six = [2.0 ** (-2 * h) for h in range(1, 5)] + [2.0**-1, 2.0**-3]  # 4, then odd ones of 8
    assert alibi_slopes(6).tolist() == pytest.approx(six)


@pytest.mark.parametrize(("window", "sink"), [(None, "none"), (5, "none"), (5, "learned")])
def test_alibi_attention_equals_a_nested_loop_reference(window, sink):
    """One layer recomputed by hand: softmax_j(q_i.k_j / sqrt(d) - m_h (i - j)) over visible j
    (and the sink's virtual key), times v_j, projected by W_O; both paths."""
    cfg = tiny(position="alibi", n_layer=1, n_head=4, window=window, sink=sink)
    model = Decoder(cfg)
    if sink == "learned":
        with torch.no_grad():
            model.layers[0].self_attn.sink_logit.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = tokens(batch=1, seq=9)
    T, H, dh = 9, 4, cfg.d_head
    _, cache = model.run_with_cache(
        x, names=["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"]
    )
    q, k, v = (cache[f"blocks.0.attn.{n}"][0].double() for n in "qkv")
    slopes = [2.0 ** (-2 * h) for h in range(1, H + 1)]
    sinks = model.layers[0].self_attn.sink_logits()
    ref = torch.zeros(T, H * dh, dtype=torch.float64)
    for h in range(H):
        for i in range(T):
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            logits = {
                j: float(q[h, i] @ k[h, j]) / math.sqrt(dh) - slopes[h] * (i - j) for j in keys
            }
            z = sum(math.exp(s) for s in logits.values())
            z += math.exp(float(sinks[h].detach())) if sinks is not None else 0.0
            for j in keys:
                ref[i, h * dh : (h + 1) * dh] += math.exp(logits[j]) / z * v[h, j]
    expected = ref @ model.layers[0].self_attn.o_proj.weight.double().T
    for eager in (False, True):
        model.force_eager = eager
        _, cache = model.run_with_cache(x, names=["blocks.0.attn.out"])
        got = cache["blocks.0.attn.out"][0].double()
        assert torch.allclose(got, expected, atol=1e-5), (eager, (got - expected).abs().max())


def test_alibi_scores_are_exactly_relative_for_the_two_way_fit():
    """With q = k = 0 the scores are the bias alone: -m_h (i - j), a function of i - j."""
    model = Decoder(tiny(position="alibi", n_layer=1))
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.zero_()
    _, cache = model.run_with_cache(tokens(seq=8), names=["blocks.0.attn.scores"])
    scores = cache["blocks.0.attn.scores"][0]
    for i in range(8):
        for j in range(i + 1):
            assert scores[0, i, j].item() == pytest.approx(-(2.0**-4) * (i - j))
            assert scores[1, i, j].item() == pytest.approx(-(2.0**-8) * (i - j))


# ------------------------------------------------------------------ paths and hooks
@pytest.mark.parametrize("overrides", VARIANTS)
def test_decoding_with_cached_keys_and_values_gives_the_forwards_logits(overrides):
    """Decoder.decode: a prompt in one pass, then a token at a time, against the whole
    sequence's forward (every scheme, window, sink, softpick and gate; NTK at inference)."""
    model = Decoder(tiny(**overrides)).eval()
    if model.scheme.inference_scale:
        model.set_rope_scale(2.0)
    x = tokens(batch=2, seq=20, seed=1)
    with torch.no_grad():
        full = model(x)
    cache = [[] for _ in model.layers]
    steps = [model.decode(x[:, :7], cache)]
    steps += [model.decode(x[:, t : t + 1], cache) for t in range(7, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache[0][0].shape == (2, 2, 20, 8)  # every key so far: (B, H, T, d_head)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_eager_and_fast_paths_agree(overrides):
    model = Decoder(tiny(**overrides))
    x = tokens(seq=20)
    fast = model(x)
    model.force_eager = True
    assert torch.allclose(model(x), fast, atol=1e-5)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_bf16_on_cpu_materialises_short_attention_and_agrees_with_the_kernel(overrides):
    """Up to EAGER_BF16_CPU keys, bf16 attention on CPU is the eager path without the NaN
    check (faster than SDPA there, and no host read); beyond it, SDPA. Both agree with fp32
    to bf16's precision and with each other."""
    model = Decoder(tiny(**overrides))
    x = tokens(seq=20)
    reference = model(x)
    with torch.autocast("cpu", torch.bfloat16), _Calls() as calls:
        short = model(x)
    assert "scaled_dot_product_attention" not in calls.names
    assert not calls.names & HOST_READS
    decoder.EAGER_BF16_CPU, saved = 0, decoder.EAGER_BF16_CPU
    try:
        with torch.autocast("cpu", torch.bfloat16), _Calls() as calls:
            kernel = model(x)
    finally:
        decoder.EAGER_BF16_CPU = saved
    kernel_used = "scaled_dot_product_attention" in calls.names
    assert kernel_used == (overrides.get("attention") != "softpick")  # softpick has none
    assert reference.std() > 0.05  # logits of this size: bf16 errors are about 1e-3
    assert torch.allclose(short.float(), kernel.float(), atol=5e-3)
    assert torch.allclose(short.float(), reference, atol=5e-3)


def test_identity_hook_leaves_outputs_unchanged_and_replacing_hook_changes_them():
    model = Decoder(tiny())
    x = tokens()
    ref = model(x)
    with model.hooks([(name, lambda t, name: t) for name in model.hook_names()]):
        assert torch.allclose(model(x), ref, atol=1e-6)
    with model.hooks([("blocks.0.resid_mid", lambda t, name: t * 2)]):
        assert not torch.allclose(model(x), ref, atol=1e-4)
    assert torch.equal(model(x), ref)  # hooks are gone


def test_every_hook_fires_exactly_once_per_forward():
    model = Decoder(tiny(sink="learned", window=3))
    calls: dict[str, int] = {}

    def count(t, name):
        calls[name] = calls.get(name, 0) + 1

    with model.hooks([(name, count) for name in model.hook_names()]):
        model(tokens())
    assert calls == {name: 1 for name in model.hook_names()}


def test_hook_shapes_match_documented_layout():
    model = Decoder(tiny())
    _, cache = model.run_with_cache(tokens(batch=3, seq=11))
    assert cache["blocks.1.attn.k"].shape == (3, 2, 11, 8)
    assert cache["blocks.1.attn.scores"].shape == (3, 2, 11, 11)
    assert cache["blocks.1.resid_post"].shape == (3, 11, 16)
    assert torch.equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])


def test_unknown_hook_name_lists_valid_names_and_hooks_are_removed_on_error():
    model = Decoder(tiny())
    with pytest.raises(KeyError, match="valid names: .*blocks.0.attn.pattern"):
        with model.hooks([("blocks.0.atn.pattern", lambda t, n: t)]):
            pass
    with pytest.raises(RuntimeError), model.hooks([("embed", lambda t, n: t)]):
        raise RuntimeError("boom")
    assert not any(point.fns for point in model.hook_points.values())


def test_nan_attention_row_raises_with_its_location():
    model = Decoder(tiny())

    def kill_row(scores, name):
        scores = scores.clone()
        scores[0, 1, 5] = float("-inf")
        return scores

    with pytest.raises(FloatingPointError, match="layer 1, head 1, query 5"):
        with model.hooks([("blocks.1.attn.scores", kill_row)]):
            model(tokens())
    with pytest.raises(FloatingPointError, match="layer 0, head 0, query 0"):
        with model.hooks([("blocks.0.attn.q", lambda q, n: q * float("nan"))]):
            model(tokens())


# ------------------------------------------------------------------ config, init, persistence
def test_invalid_configs_name_every_problem():
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=30, n_head=4, position="xpos", sink="sometimes")
    text = str(err.value)
    assert "not divisible by n_head=4" in text and "xpos" in text and "sometimes" in text
    with pytest.raises(ConfigError, match="params.scale=2.0 has no effect with position='nope'"):
        ModelConfig(position="nope", params={"scale": 2.0})


def test_shared_parameters_start_identically_across_variants():
    rope = Decoder(tiny(position="rope"), seed=3).state_dict()
    learned = Decoder(tiny(position="learned", sink="learned"), seed=3).state_dict()
    assert set(learned) - set(rope) == {"pos_embed.weight"} | {
        f"layers.{layer}.self_attn.sink_logit" for layer in range(2)
    }
    for name, value in rope.items():
        assert torch.equal(value, learned[name]), name
    other_seed = Decoder(tiny(position="rope"), seed=4).state_dict()
    assert not torch.equal(
        rope["layers.0.self_attn.q_proj.weight"], other_seed["layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip(tmp_path, tie):
    model = Decoder(tiny(position="learned", tie_embeddings=tie, sink="learned"), seed=5)
    model.save(tmp_path)
    loaded = Decoder.load(tmp_path)
    assert loaded.cfg == model.cfg
    x = tokens()
    assert torch.equal(loaded(x), model(x))
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_a_checkpoint_spells_none_as_its_config_toml_does_and_old_nulls_still_load(tmp_path):
    """One spelling on disk: window and d_ff "none" are 0 in config.json as in config.toml
    (train/config.py writes the same ModelConfig.to_dict); a config.json written before, with
    null, loads to the same model."""
    import tomllib

    from posleak.train.config import build, to_toml

    model = Decoder(tiny(position="rope", window=None, d_ff=None))
    model.save(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["window"], written["d_ff"]) == (0, 0)
    run = build({"model.n_layer": 1, "model.window": 0, "model.d_ff": 0, "data.source": "markov"})
    toml_model = tomllib.loads(to_toml(run, run.model_config(23)))["model"]
    assert (toml_model["window"], toml_model["d_ff"]) == (0, 0)
    assert run.model_config(23).window is None and run.model_config(23).d_ff is None
    (tmp_path / "config.json").write_text(json.dumps({**written, "window": None, "d_ff": None}))
    old = Decoder.load(tmp_path)
    assert old.cfg == model.cfg and torch.equal(old(tokens()), model(tokens()))
    with pytest.raises(ConfigError, match="window must be a positive integer"):
        ModelConfig.from_dict({**model.cfg.to_dict(), "window": False})


def test_runs_written_before_ropes_parameters_moved_still_load(tmp_path):
    """The one-version reader: RoPE's base and NTK scale were model fields (rope_base,
    rope_scale) before they were the RoPE schemes' own [model.params]; a config.json and a
    config.toml written then read as the same model, and a config spelling them the old way
    is told where they went."""
    import tomli_w
    import tomllib

    from posleak.train.config import build, from_resolved, to_toml

    model = Decoder(tiny(position="rope_ntk", params={"base": 500.0, "scale": 4.0}))
    model.save(tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())
    assert new["params"] == {"base": 500.0, "scale": 4.0} and "rope_base" not in new
    old = {k: v for k, v in new.items() if k != "params"} | {"rope_base": 500.0, "rope_scale": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(old))
    again = Decoder.load(tmp_path)
    assert again.cfg == model.cfg and again.rope_effective_base == 500.0 * 4.0 ** (8 / 6)
    run = build({"model.position": "nope", "model.n_layer": 1, "data.source": "markov"})
    written = tomllib.loads(to_toml(run, run.model_config(23)))
    assert "params" not in written["model"]  # NoPE has none
    written["model"] |= {"rope_base": 10000.0, "rope_scale": 1.0}  # every model wrote them
    (tmp_path / "config.toml").write_text(tomli_w.dumps(written))
    assert from_resolved(tmp_path / "config.toml").model_config(23) == run.model_config(23)
    with pytest.raises(ConfigError, match="model.rope_base is now model.params.base"):
        build({"model.rope_base": 100.0})


def test_learned_table_refuses_too_long_inputs():
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        Decoder(tiny(position="learned"))(torch.zeros(1, 65, dtype=torch.long))


def test_one_save_format_and_an_inference_scale_that_survives(tmp_path):
    model = Decoder(tiny(position="rope_ntk", params={"scale": 2.0}))
    model.set_rope_scale(4.0)
    model.save(tmp_path / "saved")
    again = Decoder.load(tmp_path / "saved")
    assert again.rope_inference_scale == 4.0
    assert again.rope_effective_base == model.rope_effective_base
    x = tokens()
    assert torch.equal(again(x), model(x))


# ------------------------------------------------------------------ no host synchronisation
HOST_READS = {"__bool__", "item", "tolist", "nonzero", "is_nonzero", "__int__", "__float__"}


class _Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", VARIANTS)
def test_the_hook_free_forward_never_reads_a_tensor_back_to_the_host(overrides):
    model = Decoder(tiny(**overrides))
    with _Calls() as calls:
        model(tokens())
    if overrides.get("attention") != "softpick":  # softpick has no fused kernel
        assert "scaled_dot_product_attention" in calls.names  # the recorder sees the forward
    assert not calls.names & HOST_READS
    with _Calls() as calls, model.hooks([("blocks.0.attn.q", lambda t, n: t)]):
        model(tokens())
    assert "__bool__" in calls.names  # a hook on q brings the finiteness check back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_device_synchronisation_in_the_forward_pass_on_cuda():
    model = Decoder(tiny(window=3, sink="learned")).cuda()
    x = tokens().cuda()
    model(x)  # the RoPE tables are built and cached on the first call
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
