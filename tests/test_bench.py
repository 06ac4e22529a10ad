"""The benchmark runs end to end and counts FLOPs by the stated convention."""

from model import Decoder, ModelConfig
from train.bench import VARIANTS, flops_per_token, print_table, run_bench


def test_flops_per_token_follows_the_stated_convention():
    cfg = ModelConfig(vocab_size=50, n_layer=3, n_head=2, d_model=32, d_ff=96, position="learned")
    per_layer = 4 * 32 * 32 + 3 * 32 * 96  # q, k, v, o + gate, up, down
    n = 3 * per_layer + 32 * 50  # + LM head; embedding lookups are not products
    assert flops_per_token(Decoder(cfg), 64) == 6 * n + 12 * 3 * 32 * 64


def test_quick_benchmark_measures_every_case(capsys):
    result = run_bench(quick=True)
    names = {r["name"] for r in result["train"]}
    assert {f"variant:{v}" for v in VARIANTS} <= names
    assert {"rope:eager-attention", "rope:no-hook-dispatch"} <= names
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 2 for r in result["train"])
    assert result["matmul_peak_flops"]["fp32"] > 1e9
    assert all(v > 1e5 for v in result["batch_tokens_per_s"].values())
    print_table(result)
    assert "variant speed / nope" in capsys.readouterr().out
    assert all(
        a["exit"] == 0 and a["seconds"] > 0 and a["peak_rss_mb"] > 50 for a in result["analysis"]
    )
