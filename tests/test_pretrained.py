"""Pretrained transformers models behind posleak's hooks: the adapter's activations are the
model's own (checked against transformers' eager attention), every measurement runs on each
supported family, and a posleak run exported to transformers is analysed to the same numbers
as the run itself."""

import dataclasses
import json
import shutil
import sys

import pytest
import torch
from conftest import collect, tiny_overrides

from posleak.analysis.engine.analyze import Options, analysis_of, analyze
from posleak.analysis.stages import stage
from posleak.cli import main
from posleak.model.rope import ntk_base
from posleak.report import number
from posleak.train.config import build
from posleak.train.export import export_hf, write_tokenizer
from posleak.train.loop import train
from posleak.train.rundir import RunDir

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
from posleak.analysis.pretrained import models as pretrained  # noqa: E402  (needs transformers)

COMMON = dict(
    vocab_size=259,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
FAMILIES = {  # name: (config, the tokenizer prepends BOS)
    "llama": (lambda: transformers.LlamaConfig(num_key_value_heads=2, **COMMON), True),
    "llama3-rope": (
        lambda: transformers.LlamaConfig(rope_parameters=LLAMA3_ROPE, **COMMON),
        True,
    ),
    "mistral": (
        lambda: transformers.MistralConfig(num_key_value_heads=2, sliding_window=8, **COMMON),
        True,
    ),
    "qwen2": (lambda: transformers.Qwen2Config(num_key_value_heads=1, **COMMON), False),
    "gemma3_text": (  # a window layer, then a global one, each with its own RoPE base
        lambda: transformers.Gemma3TextConfig(
            num_key_value_heads=1,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            **COMMON,
        ),
        True,
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **COMMON),
        False,  # as Pythia's: a BOS token that the tokenizer does not prepend
    ),
}
MEASUREMENTS = ("probe_r2_log", "c_res", "c_mask", "c_content", "abs_share", "sink_alpha0")
MEASUREMENTS += ("fingerprint_dispersion", "bos_swap_removed", "knockout_removed", "shift_js")
MEASUREMENTS += ("loss_by_position",)
NO_BOS_TOKEN = ("qwen2",)  # as Qwen2's tokenizer: none at all
SMALL = Options(
    seqs=8, seq_len=24, fingerprint_seqs=3, shift_seqs=4, early_k=(4, 8), batch_size=4,
    extrapolation_seqs=4, bootstrap=20, content_seqs=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A randomly initialised tiny model of each family, saved with a byte tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    for name, (config, bos) in FAMILIES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config())
        model.save_pretrained(root / name)
        write_tokenizer(root / name, bos=bos)
        if name in NO_BOS_TOKEN:
            tokenizer = transformers.AutoTokenizer.from_pretrained(root / name)
            tokenizer.bos_token = None
            tokenizer.save_pretrained(root / name)
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)  # a family posleak refuses
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    return root


def eager(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_and_attention_weights_are_the_models_own(models, family):
    model, _ = pretrained.load(str(models / family))
    L = model.cfg.n_layer
    names = [f"blocks.{l}.{site}" for l in range(L) for site in ("resid_pre", "resid_post")]
    names += [f"blocks.{l}.attn.pattern" for l in range(L)]
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    ours = collect(model, tokens, {n: lambda t: t for n in names}, batch_size=2)
    with torch.no_grad():
        ref = eager(models / family)(tokens, output_hidden_states=True, output_attentions=True)
    for l in range(L):  # hidden_states[L] has the final norm applied: compared through logits
        for site in {f"blocks.{l}.resid_pre", f"blocks.{l - 1}.resid_post"} & set(ours):
            assert torch.allclose(ours[site], ref.hidden_states[l], atol=1e-6), (family, site)
        assert torch.allclose(ours[f"blocks.{l}.attn.pattern"], ref.attentions[l], atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model(tokens), ref.logits, atol=1e-5)


def test_the_window_is_the_models_own(models):
    mistral, _ = pretrained.load(str(models / "mistral"))
    assert mistral.cfg.window == 8
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    pattern = collect(mistral, tokens, {"blocks.0.attn.pattern": lambda t: t})
    i, j = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    outside = (j > i) | (i - j >= 8)
    assert pattern["blocks.0.attn.pattern"][..., outside].abs().max() == 0
    assert pattern["blocks.0.attn.pattern"][..., ~outside].min() > 0


def test_a_hybrid_model_is_analysed_with_each_layers_own_window(models):
    """Gemma 3 at a length beyond its window: the window layer's fit, alpha_0 baseline and
    pattern use w = 6, the global layer's the full causal mask."""
    analysis = analysis_of(f"hf:{models / 'gemma3_text'}", SMALL)
    assert analysis.windows == (6, None) and analysis.window == 6
    assert analysis.design(0).visible.sum() < analysis.design(1).visible.sum()
    ctx = analysis.context(analysis.tokens(8, analysis.T, "analysis"))
    for l, window in enumerate((6, None)):
        column = ctx.base.first_column[l]
        assert column[..., 6:].abs().max() == (0 if window else column[..., 6:].abs().max())
    stage("sinks").run(analysis, ctx)
    uniform = {
        r["layer"]: r["value"] for r in analysis.rec.rows if r["metric"] == "sink_alpha0_uniform"
    }
    from posleak.analysis.maths.measures import uniform_alpha

    assert uniform == {0: uniform_alpha(24, 6), 1: uniform_alpha(24, None)}


def test_the_bos_replacement_acts_on_the_scaled_embedding_gemma_feeds_its_first_layer(models):
    from posleak.analysis.stages.bos_swap import replacement

    analysis = analysis_of(f"hf:{models / 'gemma3_text'}", SMALL)
    tokens = analysis.tokens(4, analysis.T, "analysis")[:, : analysis.T]
    seen = collect(analysis.model, tokens, {"embed": lambda t: t})["embed"]
    table = analysis.model.embed_tokens.weight.detach()
    assert torch.allclose(seen[:, 1], table[tokens[:, 1]] * 32**0.5, atol=1e-5)  # sqrt(d)
    token = replacement(analysis, "token", tokens)
    top = int(tokens[:, 1:].flatten().bincount().argmax())
    assert torch.allclose(token, table[top] * 32**0.5, atol=1e-5)


def test_ntk_at_inference_sets_the_frequencies_of_the_scaled_base(models):
    model, _ = pretrained.load(str(models / "llama"))
    model.set_rope_scale(4.0)
    d = model.rotary_dim
    pairs = torch.arange(0, d, 2, dtype=torch.float64) / d
    assert torch.allclose(model._rotary[0].double(), ntk_base(1e4, 4.0, d) ** -pairs, rtol=1e-6)
    assert model.rope_effective_base == pytest.approx(ntk_base(10000.0, 4.0, d))
    model.set_rope_scale(1.0)
    assert torch.allclose(model._rotary[0].double(), 1e4**-pairs, rtol=1e-6)


def test_ntk_at_inference_scales_each_layer_type_against_its_own_base(models):
    """Gemma 3's window layers rotate with base 1e4 and its global ones with 1e6: NTK at
    inference moves each to its own scaled base, and the forward pass reads them."""
    model, _ = pretrained.load(str(models / "gemma3_text"))
    d = model.rotary_dim
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
    model.set_rope_scale(8.0)
    bases = sorted(float(f[0] / f[1]) ** (d / 2) for f in model._rotary)  # 1/inv_freq[1]^(d/2)
    expected = sorted(ntk_base(b, 8.0, d) for b in (1e4, 1e6))
    assert bases == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(tokens), before)
    model.set_rope_scale(1.0)
    found = sorted(float(f[0] / f[1]) ** (d / 2) for f in model._rotary)
    assert found == pytest.approx([1e4, 1e6], rel=1e-4)


def test_fingerprint_is_bit_identical_with_a_shared_first_token(models):
    analysis = analysis_of(f"hf:{models / 'llama'}", SMALL)
    assert analysis.bos == "always"  # the tokenizer prepends BOS
    stage("fingerprint").run(analysis, None)
    rows = analysis.rec.rows

    def values(condition):
        return [
            r["value"]
            for r in rows
            if r["metric"] == "fingerprint_dispersion" and r["condition"] == condition
        ]

    assert values({"bos": "always"}) == [0.0] * 3
    assert all(v > 0.01 for v in values({"bos": "never"}))


def test_bf16_weights_keep_the_fingerprint_exact_and_the_probe_close(models):
    opts = dataclasses.replace(SMALL, dtype="bfloat16")
    bf16 = analysis_of(f"hf:{models / 'llama'}", opts)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    stage("fingerprint").run(bf16, None)
    fp = [r["value"] for r in bf16.rec.rows if r["metric"] == "fingerprint_dispersion"]
    assert fp[:3] == [0.0] * 3  # the bos condition comes first
    rows, _ = bf16.run_all()
    fp32_rows, _ = analysis_of(f"hf:{models / 'llama'}", SMALL).run_all()

    def last_probe(rows):
        return [r["value"] for r in rows if r["metric"] == "probe_r2_log"][-1]

    assert last_probe(rows) == pytest.approx(last_probe(fp32_rows), abs=0.1)


def test_a_tokenizer_without_bos_is_measured_without_and_cannot_be_asked_for_one(models):
    analysis = analysis_of(f"hf:{models / 'qwen2'}", SMALL)
    assert analysis.bos == "never"
    stage("fingerprint").run(analysis, None)
    assert all(r["condition"] == {"bos": "never"} for r in analysis.rec.rows)
    with pytest.raises(ValueError, match="no BOS token"):
        analysis.tokens(2, 8, "analysis", "always")


def test_knockout_removes_key_zero_in_the_models_own_forward(models):
    model, _ = pretrained.load(str(models / "gpt_neox"))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    names = {"blocks.0.resid_post": lambda t: t, "blocks.1.resid_post": lambda t: t}
    names["blocks.1.attn.pattern"] = lambda t: t
    base = collect(model, tokens, names)
    knocked = collect(
        model, tokens, names, interventions=[("blocks.1.attn.pattern", pretrained_knockout)]
    )
    assert torch.equal(base["blocks.0.resid_post"], knocked["blocks.0.resid_post"])
    assert knocked["blocks.1.attn.pattern"][..., 1:, 0].abs().max() == 0
    assert not torch.allclose(base["blocks.1.resid_post"], knocked["blocks.1.resid_post"])


def pretrained_knockout(pattern, name):
    from posleak.analysis.maths.measures import knock_out_key0

    return knock_out_key0(pattern)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_measurement_runs_on_each_family_and_writes_records(models, family, tmp_path):
    summary = analyze(f"hf:{models / family}", SMALL, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").open()]
    metrics = {r["metric"] for r in rows}
    assert set(MEASUREMENTS) <= metrics, (family, set(MEASUREMENTS) - metrics)
    assert summary["family"] == family.split("-")[0].replace("llama3", "llama")
    assert summary["tokenizer_adds_bos"] == FAMILIES[family][1]
    assert (tmp_path / "report.png").exists()


def test_the_command_line_analyses_a_local_model_and_compare_reads_it(models, tmp_path, capsys):
    out = tmp_path / "llama"
    args = [
        "analyze",
        f"hf:{models / 'llama'}",
        "--seqs",
        "8",
        "--seq-len",
        "16",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "probe R^2" in capsys.readouterr().out
    assert main(["compare", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "`llama`" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize(
    "target, message",
    [
        ("hf:someone/not-here-for-sure", "cannot load"),
        ("hf:{models}/llama --data markov", "must be a text source"),
        ("hf:{models}/qwen2 --bos always", "no BOS token"),
        ("hf:{models}/llama --step 3", "--step selects"),
        ("hf:{models}/gpt2", "not among them"),
        ("hf:{models}/llama --device nonsense", "not a torch device"),
    ],
)
def test_bad_pretrained_input_gets_one_line(models, target, message, capsys):
    args = ["analyze", *target.format(models=models).split(), "--seqs", "4", "--seq-len", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_transformers_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if absent
    assert main(["analyze", "hf:any/model", "--seqs", "4"]) == 2
    assert "pip install -e '.[hf]' in posleak's clone" in capsys.readouterr().err


def test_an_exported_run_analysed_through_transformers_gives_the_runs_numbers(tmp_path):
    """Byte tokenizer, seed 0 and the same validation text: the hf: path draws the very tokens
    the run's own analysis reads, so every record must agree to float tolerance."""
    cfg = build(tiny_overrides(data__source="bible", data__bos="always", train__steps=30))
    run = tmp_path / "run"
    train(cfg, run)
    export_hf(run, tmp_path / "hf")
    native = analysis_of(run, SMALL)
    through = analysis_of(f"hf:{tmp_path / 'hf'}", SMALL)
    assert torch.equal(native.tokens(8, 24, "analysis"), through.tokens(8, 24, "analysis"))
    native_rows, _ = native.run_all()
    through_rows, _ = through.run_all()

    def table(rows):  # extrapolation aside: the run's T0 is its training length, 32
        return {
            (r["metric"], r["layer"], r["head"], r["query"], json.dumps(r["condition"])): r["value"]
            for r in rows
            if "len" not in (r["condition"] or {})
            and r["metric"] not in ("loss_beyond_train", "val_loss")  # val_loss: training's
        }

    a, b = table(native_rows), table(through_rows)
    assert set(a) == set(b) and len(a) > 900
    for key, value in a.items():
        if value is None:
            assert b[key] is None, key
        else:
            assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    assert RunDir(run).read_config()[0].seed == 0


def test_the_pretrained_study_analyses_each_contrast_once_and_reports_from_the_records(
    models, tmp_path, monkeypatch
):
    """`posleak pretrained-study`: both BOS policies for a model whose tokenizer has BOS, NTK
    at inference on its own policy, a hybrid (window 16 at T 16) also at 2w, and a RoPE run as
    GGUF at F32 and Q4_0; the report's numbers are the records' and a second call reuses
    every analysis."""
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    hybrid = tmp_path / "hybrid"
    config = transformers.Gemma3TextConfig(
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        **{**COMMON, "num_hidden_layers": 3},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hybrid)
    write_tokenizer(hybrid, bos=True)
    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible", model__d_model=64)), run)
    work, out = tmp_path / "work", tmp_path / "out" / "study.md"
    args = ["pretrained-study", f"hf:{models / 'llama'}", f"hf:{hybrid}", "--quantised", str(run)]
    args += ["--seqs", "8", "--seq-len", "16", "--work", str(work), "--out", str(out)]
    assert main(args) == 0
    kinds = {p.parent.name + "/" + p.name for p in work.glob("*/*") if p.is_dir()}
    (tag,) = {p.name.split("-")[1] for p in (work / "quantisation").glob("run-*.gguf")}
    assert kinds == {
        "llama/bos-always", "llama/bos-never", "hybrid/bos-always", "hybrid/bos-never",
        "hybrid/long", f"quantisation/run-{tag}-F32", f"quantisation/run-{tag}-Q4_0",
    }  # fmt: skip
    native = json.loads((work / "llama" / "bos-always" / "analysis.json").read_text())
    assert native["options"]["ntk_scales"] == [2.0, 4.0, 8.0]  # the tokenizer prepends BOS
    assert (
        json.loads((work / "llama" / "bos-never" / "analysis.json").read_text())["options"][
            "ntk_scales"
        ]
        == []
    )
    long = json.loads((work / "hybrid" / "long" / "analysis.json").read_text())
    assert long["seq_len"] == 32 and long["windows"] == [16, 16, None]
    report = out.read_text()
    rows = [json.loads(line) for line in (work / "hybrid" / "long" / "records.jsonl").open()]
    (diff,) = [r for r in rows if r["metric"] == "c_res_window_hybrid_diff"]
    assert diff["condition"] == {"w": 16} and diff["lo"] <= diff["value"] <= diff["hi"]
    assert "Window layers against global layers" in report
    assert f"[{number(diff['lo'], 3)}, {number(diff['hi'], 3)}]" in report
    rows = [json.loads(line) for line in (work / "llama" / "bos-always" / "records.jsonl").open()]
    (ntk4,) = [
        r
        for r in rows
        if r["metric"] == "ntk_loss_change" and r["condition"] == {"s": 4.0, "queries": "all"}
    ]
    assert "| s = 4 |" in report and number(ntk4["value"], 3) in report
    assert "## Quantisation" in report and "Q4_0 − F32" in report
    stamp = (work / "llama" / "bos-always" / "analysis.json").stat().st_mtime_ns
    from posleak.analysis.reports import pretrained_study

    def no_loading(target, opts):
        raise AssertionError(f"{target} loaded though every analysis of it is current")

    with monkeypatch.context() as patched:
        patched.setattr(pretrained_study, "subject_of", no_loading)
        assert main(args) == 0  # everything reused, no model loaded
        assert out.read_text() == report
    assert (work / "llama" / "bos-always" / "analysis.json").stat().st_mtime_ns == stamp
    shutil.rmtree(run)  # retrained in the same folder: exported and analysed again
    train(build(tiny_overrides(data__source="bible", model__d_model=64, seed=1)), run)
    assert main(args) == 0
    tags = {p.name.split("-")[1] for p in (work / "quantisation").glob("run-*.gguf")}
    assert len(tags) == 2 and tag in tags
    assert main(["pretrained-study", str(run), "--work", str(work), "--out", str(out)]) == 2
