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


def test_python_m_posleak_is_not_shadowed_by_a_users_train_or_model_module(tmp_path):
    import subprocess
    import sys

    from conftest import tiny_overrides, write_config

    for name in ("train.py", "model.py", "data.py", "analysis.py"):
        (tmp_path / name).write_text("raise ImportError('a user file was imported')\n")
    config = write_config(tmp_path / "run.toml", tiny_overrides(train__steps=2))
    cmd = [sys.executable, "-m", "posleak", "train", str(config), "--out", str(tmp_path / "r")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r" / "summary.json").exists()


def test_help_imports_no_torch_and_version_is_printed():
    import subprocess
    import sys

    probe = "import sys\nfrom posleak.cli import parser\nparser()\nprint('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )
    out = subprocess.run(
        [sys.executable, "-m", "posleak", "--version"], capture_output=True, text=True
    )
    assert out.stdout.startswith("posleak 0.")


def test_errors_are_one_line_unless_debug(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[data]\nsource = "no/such/file.txt"\n')
    assert main(["train", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "matches no file" in err
    assert main(["--debug", "train", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_run_without_a_terminal_prints_a_progress_line_every_log_every_steps(tmp_path):
    import re
    import subprocess
    import sys

    from conftest import tiny_overrides, write_config

    values = tiny_overrides(train__steps=6, train__log_every=2, log__progress=True)
    config = write_config(tmp_path / "run.toml", values)
    cmd = [sys.executable, "-m", "posleak", "train", str(config), "--out", str(tmp_path / "r")]
    out = subprocess.run(cmd, capture_output=True, text=True).stderr  # the log, not the result
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    pattern = r"train loss [\d.]+ \| (val loss [\d.]+ \| )?[\d,]+ tok/s \| elapsed \S+ \| eta \S+"
    assert all(re.search(pattern, line) for line in lines), lines
    assert "val loss" in lines[1]  # eval_every = 4
