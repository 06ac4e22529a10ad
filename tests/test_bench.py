"""The benchmark runs end to end and counts FLOPs by the stated convention."""

from pathlib import Path

from posleak.model import Decoder, ModelConfig
from posleak.train.bench import print_table, run_bench
from posleak.train.config import presets
from posleak.train.environment import flops_per_token


def test_flops_per_token_follows_the_stated_convention():
    cfg = ModelConfig(vocab_size=50, n_layer=3, n_head=2, d_model=32, d_ff=96, position="learned")
    per_layer = 4 * 32 * 32 + 3 * 32 * 96  # q, k, v, o + gate, up, down
    n = 3 * per_layer + 32 * 50  # + LM head; embedding lookups are not products
    assert flops_per_token(Decoder(cfg), 64) == 6 * n + 12 * 3 * 32 * 64


def test_quick_benchmark_measures_every_case(capsys):
    from posleak.commands import analysis_cost

    result = run_bench(quick=True)
    result["analysis"] = analysis_cost([(16, 32, None)], 64)
    names = {r["name"] for r in result["train"]}
    assert {f"variant:{v}" for v in presets()} <= names
    assert "rope:eager-attention" in names
    assert {"size:d64:reference", "size:d64:nope", "size:d64:llama-fp32"} <= names
    assert "size:d64:fused-adamw" in names
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 2 for r in result["train"])
    assert result["matmul_peak_flops"]["fp32"] > 1e9
    assert all(v > 1e5 for v in result["batch_tokens_per_s"].values())
    print_table(result)
    out = capsys.readouterr().out
    assert "variant speed / nope" in out and "over the GPT-2 reference: rope" in out
    assert "fp32: posleak rope / transformers Llama" in out
    assert "torch fused AdamW / posleak AdamW at d_model=64" in out
    assert all(
        a["exit"] == 0 and a["seconds"] > 0 and a["peak_rss_mb"] > 50 for a in result["analysis"]
    )


def test_reference_model_is_causal_and_counts_like_nanogpt():
    import torch

    from posleak.train.reference import ReferenceGPT

    ref = ReferenceGPT(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_len=16)
    tokens = torch.randint(0, 50, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 50
    a, b = ref(tokens), ref(changed)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])
    per_layer = 32 * 96 + 32 * 32 + 2 * 32 * 128  # c_attn, attn_proj, c_fc, mlp_proj
    assert flops_per_token(ref, 16) == 6 * (2 * per_layer + 50 * 32) + 12 * 2 * 32 * 16


def test_the_transformers_llama_reference_has_posleaks_shape():
    from posleak.train.reference import TransformersLlama

    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, position="rope")
    ours, theirs = Decoder(cfg), TransformersLlama(cfg, 16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)  # the same matrices, norms and embeddings
    assert flops_per_token(ours, 16) == flops_per_token(theirs, 16)
    from posleak.train.export import hf_weights

    named = hf_weights(ours)
    assert not theirs.hf.load_state_dict(named, strict=False).missing_keys  # Llama's names
    import torch

    tokens = torch.randint(0, 50, (2, 16))
    assert torch.allclose(ours(tokens), theirs(tokens), atol=1e-5)  # the same function


def test_the_end_to_end_script_trains_analyses_and_times_at_a_tiny_size(tmp_path):
    """What a first GPU slot runs (`posleak bench --end-to-end`), here on CPU at a tiny size so
    that it cannot rot: one JSON row per config with its tokens/s, MFU and analysis time."""
    import json

    from posleak.cli import main

    tiny = ["model.n_layer=2", "model.d_model=32", "data.seq_len=32", "train.steps=4",
            "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1", "train.warmup=0",
            "log.progress=false"]  # fmt: skip
    out, work = tmp_path / "e2e.json", tmp_path / "work"
    config = str(Path(__file__).resolve().parent.parent / "configs/rope.toml")
    args = ["bench", "--end-to-end", config, "--seqs", "8", "--work", str(work)]
    assert main([*args, *(f"--set={o}" for o in tiny), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["runs"]
    assert row["config"] == "rope" and row["steps"] == 4 and row["precision"] == "fp32"
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["analysis_s"] > 0
    assert (work / "rope" / "analysis" / "analysis.json").exists()  # the runs stay


def test_pass_throughput_times_every_kind_of_pass_in_both_dtypes(tmp_path, capsys):
    """`posleak bench --passes`: each kind of analysis pass timed on a run, and on the same
    model read through transformers with float32 and bfloat16 weights side by side."""
    import json

    from conftest import tiny_overrides

    from posleak.cli import main
    from posleak.train.config import build
    from posleak.train.export import export_hf
    from posleak.train.loop import train

    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible")), run)
    export_hf(run, tmp_path / "hf")
    for target, dtypes in (
        (str(run), ["float32"]),
        (f"hf:{tmp_path / 'hf'}", ["float32", "bfloat16"]),
    ):
        out = tmp_path / "passes.json"
        args = ["bench", "--passes", target, "--seqs", "4", "--rounds", "1", "--out", str(out)]
        assert main(args) == 0
        rows = json.loads(out.read_text())["passes"]
        assert [(r["dtype"], r["pass"]) for r in rows] == [
            (d, k)
            for d in dtypes
            for k in ("forward", "loss", "base pass", "intervention", "logit fits")
        ]
        assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["repeats"] == 1 for r in rows)
    printed = capsys.readouterr().out
    assert "bfloat16 speed-up over float32: forward" in printed
