"""Hostile configs and arguments: values out of range, malformed files, wrong shapes and types,
through the command line and the Python API. Each case through the real command line where
there is one: a one-line error naming the problem and the fix (no traceback), and nothing on
disk lost or silently wrong."""

import json
import re

import pytest
import torch
from hostile import one_line_error, tiny_config

from posleak.cli import main


@pytest.mark.parametrize(
    "override",
    [
        "train.min_lr_ratio=-1",
        "train.weight_decay=-0.1",
        "train.beta1=1.0",
        "train.threads=-1",
        "train.threads=4611686018427387904",
        "model.params.scale=1e308",
        "model.params.base=1e308",
        "train.lr=inf",
        "train.grad_clip=nan",
        "model.norm_eps=-1e-5",
        "train.batch_size=1000000000",
        "model.d_model=1000000",
        "data.seq_len=0",
        "data.val_fraction=0.0",
    ],
)
def test_values_out_of_range_are_refused_up_front(tmp_path, capsys, override):
    key = override.split("=")[0].split(".")[-1]
    one_line_error(
        capsys,
        "train",
        tiny_config(tmp_path),
        "--set",
        override,
        "--out",
        tmp_path / "r",
        match=key,
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("include = 5\n", "include must be"),
        (b"[model]\nn_layer = 2 # \xff\n", "not UTF-8"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_malformed_config_files_are_one_line(tmp_path, capsys, text, match):
    config = tmp_path / "bad.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match=match)


def test_a_directory_as_config_and_a_file_as_out_are_one_line(tmp_path, capsys):
    one_line_error(capsys, "train", tmp_path, match="is a directory")
    existing = tmp_path / "file"
    existing.write_text("keep me")
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", existing, match="is a file")
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"n_layer": True, "vocab_size": True}, "n_layer must be a positive integer, got True"),
        ({"window": True}, "window must be a positive integer"),
        ({"d_ff": False}, "d_ff must be a positive integer"),
        ({"norm_eps": True}, "norm_eps must be a number, got True"),
        ({"params": {"base": "1e4"}}, "params.base must be a float, got '1e4'"),
        ({"tie_embeddings": 1}, "tie_embeddings must be true or false"),
        ({"position": "rope_ntk", "params": {"scale": 4.0}, "d_model": 4, "n_head": 2}, "d/(d-2)"),
    ],
)
def test_the_python_api_refuses_what_the_config_file_refuses(values, field):
    """True is an int to Python: ModelConfig(n_layer=True) once built a one-layer model."""
    from posleak.model import ModelConfig
    from posleak.model.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(field)):
        ModelConfig(**values)


@pytest.mark.parametrize("ids", [[1, 2, 30], [1, -2, 3]], ids=["above", "negative"])
def test_token_ids_outside_the_vocabulary_are_named_by_the_python_api(ids):
    from posleak.model import Decoder, ModelConfig

    model = Decoder(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\).*from -?\d+ to \d+"):
        model(torch.tensor([ids]))


@pytest.mark.parametrize("result", ["float64", "list"])
def test_a_hook_returning_the_wrong_thing_is_named(result):
    from posleak.model import Decoder, ModelConfig

    model = Decoder(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8))

    def my_hook(pattern, name):
        return pattern.double() if result == "float64" else [1]

    expected = "torch.float64" if result == "float64" else "list"
    with pytest.raises(
        TypeError, match=f"hook 'my_hook' on blocks.0.attn.pattern returned {expected}"
    ):
        with model.hooks([("blocks.0.attn.pattern", my_hook)]):
            model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize(
    ("args", "text"),
    [(["--set", "model=3"], None), ([], "[[train]]\nsteps = 3\n")],
    ids=["set-a-section", "array-of-tables"],
)
def test_a_section_given_a_value_is_named_as_a_section(tmp_path, capsys, args, text):
    config = tiny_config(tmp_path)
    if text:  # alone: beside the tiny config's [train] it would not even be TOML
        config.write_text(text)
    err = one_line_error(capsys, "train", config, *args, "--print-config", match="is a section")
    assert "did you mean" not in err


def test_a_head_dimension_of_two_builds_plain_rope():
    from posleak.model import Decoder, ModelConfig

    model = Decoder(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=4))
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 10)


def test_nul_bytes_anywhere_in_a_file_are_refused(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(b"plain text\n" * 2000 + b"\0" * 50 + b"more\n" * 100)
    config = tiny_config(tmp_path, data__source=str(text), data__cache_dir=str(tmp_path / "c"))
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match="NUL bytes")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--set", f"seed={2**63}"], "seed must be in"),
        (["--set", "model.vocab_size=100000000"], "vocab_size=100000000 is beyond"),
        (["--set", "model.d_ff=1000000000"], "d_ff=1000000000 is beyond"),
        (["--set", "model.max_seq_len=100000000"], "max_seq_len=100000000 is beyond"),
        (["--set", "data.params.markov_concentration=inf"], "markov_concentration must be finite"),
        (["--set", "preset=nonesuch"], "unknown preset 'nonesuch'"),
        (["--set", "model.d_ff=200000", "--set", "model.d_model=8192"], "GiB"),
    ],
)
def test_unbounded_values_are_refused_before_anything_is_allocated(tmp_path, capsys, args, match):
    one_line_error(
        capsys, "train", tiny_config(tmp_path), *args, "--out", tmp_path / "r", match=match
    )
    assert not (tmp_path / "r").exists()


def test_an_absurd_lock_pid_and_deep_includes_are_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": "h", "pid": 10**20}))
    one_line_error(capsys, "train", tiny_config(tmp_path), "--out", run, match="no readable owner")
    tiny_config(tmp_path, name="c0.toml")
    for i in range(1, 60):
        (tmp_path / f"c{i}.toml").write_text(f'include = "c{i - 1}.toml"\n')
    one_line_error(
        capsys, "train", tmp_path / "c59.toml", "--out", tmp_path / "x", match="nest deeper"
    )


def test_a_utf8_bom_and_a_preset_on_the_command_line_are_accepted(tmp_path, capsys):
    config = tiny_config(tmp_path)
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    args = ["train", str(config), "--set", "preset=swa", "--out", str(tmp_path / "r")]
    assert main([*args, "--print-config"]) == 0
    assert "window = 32" in capsys.readouterr().out and not (tmp_path / "r").exists()
    assert main(args) == 0
    assert "window = 32" in (tmp_path / "r" / "config.toml").read_text()


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("data.source", '""', "data.source is empty"),
        ("data.params.markov_order", str(2**62), "data.params.markov_order"),
        ("data.params.induction_copies", str(2**62), "data.params.induction_copies"),
    ],
)
def test_values_that_would_read_the_wrong_data_or_never_answer_are_refused(
    tmp_path, capsys, key, value, says
):
    """An empty source once trained on every file under the current folder; a Markov order
    of 2^62 computed 64^(2^62) to check its range and never answered; 2^62 induction copies
    looped in the first batch. Each is refused at once, with the key named."""
    source = "induction" if "induction" in key else "markov" if "markov" in key else "bible"
    extra = ["--set", f"data.source={source}"]
    out = tmp_path / "run"
    code = main(["train", "rope", *extra, "--set", f"{key}={value}", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert says in error and "Traceback" not in error
    assert not out.exists()
