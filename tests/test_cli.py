"""The console entry point wires every subcommand; errors come back as messages, not tracebacks."""

import pytest

from posleak.cli import main


def test_every_subcommand_has_help(capsys):
    for command in ("train", "sweep", "analyze", "compare", "bench"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "usage: posleak " + command in capsys.readouterr().out


def test_bad_config_key_is_a_message_and_exit_code_2(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nn_layers = 2\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'model.n_layer'?" in err and "Traceback" not in err


def test_analyze_of_a_missing_run_is_a_message(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
