"""The extension points hold: a positional scheme with a parameter of its own is one class
(and, shipped, its preset and this kind of test). Here partial RoPE, defined in the test and
registered for its length: configured from TOML through `[model.params]`, trained, saved,
reloaded and analysed, with no other file touched."""

from typing import ClassVar

import pytest
import torch
from conftest import TINY, write_config

from posleak.analysis.engine.analyze import Options, analyze
from posleak.analysis.engine.folder import AnalysisDir
from posleak.model import ConfigError
from posleak.model.positions import SCHEMES, Rope
from posleak.train.config import load
from posleak.train.loop import train
from posleak.train.rundir import RunDir


class PartialRope(Rope):
    """RoPE on the first `rotary_fraction` of each head's rotary pairs; the rest do not turn."""

    name = "rope_partial"
    params: ClassVar[dict] = {**Rope.params, "rotary_fraction": 0.5}  # RoPE's base, and its own
    inference_scale = False
    exportable = False

    def problems(self, cfg) -> list[str]:
        fraction = self.param(cfg, "rotary_fraction")
        out = super().problems(cfg)
        if not 0 < fraction <= 1:
            out.append(f"params.rotary_fraction must be in (0, 1], got {fraction}")
        return out

    def rotated_width(self, cfg) -> int:
        return 2 * max(1, round(self.param(cfg, "rotary_fraction") * cfg.d_head / 2))


def config_file(path, extra: str) -> str:
    """A tiny config as a TOML file, with `extra` TOML appended."""
    write_config(path, TINY)
    path.write_text(path.read_text() + extra)
    return str(path)


def test_a_scheme_with_its_own_parameter_is_one_class(tmp_path, monkeypatch):
    monkeypatch.setitem(SCHEMES, "rope_partial", PartialRope())
    extra = "[model.params]\nrotary_fraction = 0.25\n"
    path = config_file(tmp_path / "partial.toml", extra)
    cfg = load(path, ["model.position=rope_partial"])
    assert cfg.model["params"] == {"rotary_fraction": 0.25}
    run = tmp_path / "run"
    train(cfg, run)
    model, _, _ = RunDir(run).load_model()  # through config.toml and config.json
    assert model.cfg.params == {"base": 10000.0, "rotary_fraction": 0.25}  # as built
    assert model.cfg.position == "rope_partial"
    assert (
        "[model.params]\nbase = 10000.0\nrotary_fraction = 0.25"
        in (run / "config.toml").read_text()
    )
    cos, sin = model.scheme.rotation(model.cfg, 16, 1.0)
    turning = cos.shape[-1] // 4  # a quarter of the pairs turn, at the rotated width's rates
    r = 2 * turning
    omega = 10000.0 ** (-2 * torch.arange(turning, dtype=torch.float64) / r)
    expected = torch.outer(torch.arange(16, dtype=torch.float64), omega).cos().float()
    torch.testing.assert_close(cos[:, 0, :turning], expected)
    assert torch.all(cos[:, :, turning:] == 1) and torch.all(sin[:, :, turning:] == 0)
    ntk = model.scheme.effective_base(model.cfg, 4.0)  # the NTK exponent of the rotated width
    assert ntk == pytest.approx(10000.0 * 4.0 ** (r / (r - 2)))
    analyze(run, Options(seqs=8, stages=("probe",)))
    assert AnalysisDir(run / "analysis").read_summary()["headline"]
    typo = r"params.rotary_fractoin is not a parameter of any scheme \(the schemes' parameters: "
    with pytest.raises(ConfigError, match=typo + r"base, rotary_fraction, scale\)"):
        load(path, ["model.position=rope_partial", "model.params.rotary_fractoin=0.5"])
    with pytest.raises(ConfigError, match="params.rotary_fraction must be a float, got 'half'"):
        load(path, ["model.position=rope_partial", "model.params.rotary_fraction=half"])
    with pytest.raises(ConfigError, match=r"params.rotary_fraction must be in \(0, 1\], got 2"):
        load(path, ["model.position=rope_partial", "model.params.rotary_fraction=2.0"])
    # another scheme's parameter is allowed and unused (a base config shared by variants),
    # and the model as built holds only its own scheme's
    plain = load(path, ["model.position=rope"]).model_config(259)
    assert plain.params == {"base": 10000.0}
