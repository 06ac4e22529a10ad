"""Everyday use as a new user meets it: the README's commands as printed, resume from the run's
own config, configs printed, models sampled, exports with a card, a quiet library."""

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import deterministic_metrics, tiny_overrides, write_config

from posleak.cli import main
from posleak.train.config import build, read_toml
from posleak.train.loop import train
from posleak.train.rundir import RunDir
from posleak.train.sample import generate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIBLE_TINY = [  # the README's commands at a test's budget: appended to the first one only
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=32",
    "data.seq_len=32",
    "train.steps=4",
    "train.batch_size=2",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.warmup=1",
    "log.progress=false",
]


def readme_commands(marker: str) -> list[str]:
    """The `posleak ...` lines of the README's bash blocks that contain `marker`."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("posleak ") and marker in command:
                lines.append(command)
    return lines


def test_the_readmes_resume_example_works_as_printed(tmp_path, monkeypatch, capsys):
    first, resume = readme_commands("swa64-s3")
    assert "--resume" in resume and "--set" not in resume  # the run's own config, no retyping
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    tiny = [arg for key in BIBLE_TINY for arg in ("--set", key)]
    assert main(shlex.split(first)[1:] + tiny) == 0
    assert main(shlex.split(resume)[1:]) == 0
    out = capsys.readouterr().out
    assert "runs/swa64-s3" in out and "after 4 steps" in out
    saved = (tmp_path / "runs/swa64-s3/config.toml").read_text()
    assert "window = 64" in saved and "seed = 3" in saved


def test_resume_accepts_only_the_keys_that_may_change_and_lists_valid_keys_once(tmp_path, capsys):
    run = tmp_path / "run"
    train(build(tiny_overrides()), run)
    assert main(["train", "--resume", str(run), "--set", "model.n_layer=3"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layer" in err and "train.steps" in err and len(err.splitlines()) == 1
    assert main(["train", "--resume", str(run), "--set", "train.steps=16"]) == 0
    assert RunDir(run).summary()["steps"] == 16
    config = write_config(tmp_path / "c.toml", tiny_overrides(model__nlayer=2, train__lrr=1))
    assert main(["train", str(config), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("valid keys") == 1 and "did you mean 'model.n_layer'" in err


def test_a_runs_saved_config_toml_is_a_valid_input(tmp_path):
    run = tmp_path / "run"
    train(build(tiny_overrides()), run)
    again = tmp_path / "again"
    assert main(["train", str(run / "config.toml"), "--out", str(again)]) == 0
    assert deterministic_metrics(again / "metrics.jsonl") == deterministic_metrics(
        run / "metrics.jsonl"
    )
    broken = (run / "config.toml").read_text() + "\n[derived.extra]\nx = 1\n"
    (tmp_path / "broken.toml").write_text(broken)
    assert main(["train", str(tmp_path / "broken.toml"), "--out", str(tmp_path / "b")]) == 2


def test_debug_works_after_the_subcommand(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[data]\nsource = "no/such/file.txt"\n')
    assert main(["train", str(config), "--out", str(tmp_path / "r"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_preset_by_name_trains_without_a_config_file(capsys):
    assert main(["train", "swa", "--print-config"]) == 0
    printed = capsys.readouterr().out
    built = {k: v for k, v in build(read_toml(ROOT / "configs/swa.toml")).to_dict().items()}
    import tomllib

    values = tomllib.loads(printed)
    for section in ("data", "train", "log"):
        assert values[section] == built[section], section
    for key, value in built["model"].items():  # configs/base.toml also caps max_seq_len
        assert key == "max_seq_len" or values["model"][key] == value, key
    d = values["model"]["d_model"]  # d_ff = 0 reads "8/3 d_model rounded up to 32": say it
    assert values["model"]["d_ff"] == 0 and values["derived"]["ff_width"] == -(-8 * d // 96) * 32


def test_sweep_print_config_prints_every_runs_resolved_config(tmp_path, capsys):
    write_config(tmp_path / "base.toml", tiny_overrides())
    path = tmp_path / "sweep.toml"
    path.write_text('base = "base.toml"\nseeds = [0, 1]\n[variants.rope]\n[variants.nope]\n')
    path.write_text(path.read_text() + 'model.position = "nope"\nmodel.params.base = 100.0\n')
    assert main(["sweep", str(path), "--print-config", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert out.count("# rope-s") == 2 and out.count("# nope-s") == 2
    assert out.count('position = "nope"') == 2 and not (tmp_path / "s").exists()
    # the model as built: every key, and only its own scheme's parameters (NoPE has none)
    assert out.count("base = 10000.0") == 2 and "base = 100.0" not in out
    assert out.count("d_ff = 0") == 4 and out.count("[model]\nvocab_size = 20") == 4


def test_greedy_sampling_follows_the_argmax_and_top_k_is_reproducible(tmp_path, capsys):
    run = tmp_path / "run"
    train(build(tiny_overrides()), run)
    model, _, _ = RunDir(run).load_model()
    prompt = [17, 3, 5]
    ids = generate(model, prompt, 6, context=32)
    expected = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # the slow way: the whole sequence again for every token
            expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
    assert ids == expected
    cropped = list(prompt)  # past the context the last 5 ids are read afresh, from position 0
    with torch.no_grad():
        for _ in range(8):
            cropped.append(int(model(torch.tensor([cropped[-5:]]))[0, -1].argmax()))
    assert generate(model, prompt, 8, context=5) == cropped
    a = generate(model, prompt, 6, top_k=5, temperature=0.8, seed=3)
    assert a == generate(model, prompt, 6, top_k=5, temperature=0.8, seed=3)
    assert main(["sample", str(run), "--prompt", "3 5", "--tokens", "4"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:3] == ["17", "3", "5"] and len(printed) == 7  # BOS of the 20-token vocab
    assert main(["sample", str(run), "--prompt", "hello"]) == 2
    capsys.readouterr()
    args = ["sample", str(run), "--prompt", "3 5", "--tokens", "6", "--top-k", "5"]
    assert main([*args, "--seed", "3", "--num-samples", "2"]) == 0
    samples = capsys.readouterr().out.split("--- sample ")[1:]
    assert [s.split("\n")[0] for s in samples] == ["1 of 2 (seed 3)", "2 of 2 (seed 4)"]
    for text, seed in zip(samples, (3, 4), strict=True):  # each is that seed's own sample
        ids = generate(model, [17, 3, 5], 6, top_k=5, seed=seed, context=32)
        assert text.split("\n")[1].split() == [str(i) for i in ids]


def test_sampling_a_text_run_writes_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    values = dict(tiny_overrides(data__source="bible", data__vocab_size=67))
    run = tmp_path / "run"
    train(build(values), run)
    assert main(["sample", str(run), "--prompt", "In the beginning", "--tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("In the beginning")


def test_an_export_has_a_card_a_generation_config_and_shared_modes(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible")), run)
    old = os.umask(0o022)
    try:
        assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "hf"
    card = (out / "README.md").read_text()
    assert "RoPE, base 10000" in card and "`bible`" in card and "12 steps" in card
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 32  # the training length
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 256 and generation["eos_token_id"] == 257
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
    assert main(["export", str(run), "--out", str(out)]) == 0  # an earlier export is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "mine")]) == 2


def test_used_as_a_library_posleak_prints_nothing_below_warning(tmp_path):
    config = write_config(tmp_path / "c.toml", tiny_overrides(log__progress=True))
    script = (
        "import sys\n"
        "from posleak.train import config, loop\n"
        "loop.train(config.load(sys.argv[1]), sys.argv[2])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(config), str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "step " not in done.stderr
    assert (tmp_path / "r" / "summary.json").exists()


def test_load_gives_a_run_or_a_gguf_file_with_the_same_hooks_and_a_cache_without_grad(tmp_path):
    """posleak.analysis.load: a run folder and its GGUF export (at F32) answer to the same hook
    names with the same activations; run_with_cache keeps no graph unless asked, and takes
    TransformerLens's names_filter as a list or a function."""
    pytest.importorskip("gguf", reason="the hf extra is not installed")
    from posleak.analysis import load

    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible")), run)
    assert (
        main(
            [
                "export",
                str(run),
                "--format",
                "gguf",
                "--quant",
                "F32",
                "--out",
                str(tmp_path / "m.gguf"),
            ]
        )
        == 0
    )
    ours, theirs = load(run), load(tmp_path / "m.gguf")
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    name = "blocks.1.attn.pattern"
    logits, cache = ours.run_with_cache(tokens, names_filter=lambda n: n == name)
    assert not logits.requires_grad and list(cache) == [name]
    other_logits, other = theirs.run_with_cache(tokens, names_filter=[name])
    assert torch.allclose(cache[name], other[name], atol=1e-5)
    assert torch.allclose(logits, other_logits, atol=1e-4)
    assert ours.run_with_cache(tokens, names=[name], grad=True)[0].requires_grad
    with pytest.raises(KeyError, match="no hook point 'hook_pattern'"):
        ours.run_with_cache(tokens, names=["hook_pattern"])


def test_init_writes_the_configs_and_never_replaces_a_users_file(tmp_path, capsys):
    assert main(["init", str(tmp_path)]) == 0
    shipped = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.toml"))
    written = sorted(p.relative_to(tmp_path / "configs") for p in tmp_path.rglob("*.toml"))
    assert written == shipped and f"{len(shipped)} config files written" in capsys.readouterr().out
    (tmp_path / "configs" / "rope.toml").write_text("# mine\n")
    (tmp_path / "configs" / "sinks.toml").unlink()
    assert main(["init", str(tmp_path)]) == 2
    assert "rope.toml with other contents; nothing was written" in capsys.readouterr().err
    assert (tmp_path / "configs" / "rope.toml").read_text() == "# mine\n"
    assert not (tmp_path / "configs" / "sinks.toml").exists()
