"""Weights & Biases: the mode follows the user's environment, and a tiny run logged offline with
the wandb that pip installs today can be read back from its run file."""

import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides

from posleak.train import tracking
from posleak.train.config import build
from posleak.train.loop import train

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")


def test_mode_respects_wandb_mode_then_keys_then_stored_credentials(tmp_path):
    stored = tmp_path / "netrc"
    stored.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    empty = tmp_path / "empty"
    empty.write_text("")
    assert tracking.mode({"WANDB_MODE": "disabled"}, str(stored))[0] == "disabled"
    assert tracking.mode({"WANDB_API_KEY": "k"}, str(empty))[0] == "online"
    assert tracking.mode({}, str(stored)) == ("online", "credentials stored by `wandb login`")
    chosen, why = tracking.mode({}, str(empty))
    assert chosen == "offline" and "offline" in why


def wandb_records(path: Path) -> list:
    """Records of a .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte record headers:
    crc32, length, type) of wandb's protobuf Records, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_an_offline_run_logs_every_metric_and_the_full_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "sweepname" / "rope-s0"
    run.mkdir(parents=True)
    (run / "sweep.json").write_text(json.dumps({"variant": "rope", "seed": 0}))
    train(build(tiny_overrides(log__wandb=True, train__steps=6)), run)
    (file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(file)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            history[int(items["_step"])] = {k: json.loads(v) for k, v in items.items()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [m["step"] for m in metrics]
    for m in metrics:
        assert history[m["step"]]["train_loss"] == pytest.approx(m["train_loss"])
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.run_id == (run / "wandb_id.txt").read_text().strip()
    assert info.display_name == "rope-s0" and info.run_group == "sweepname"
    assert set(info.tags) == {"rope", "seed=0"}
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert config["model"]["window"] == 0 and config["derived"]["n_params"] > 0


def test_a_missing_wandb_is_reported_before_the_run_directory_exists(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(RuntimeError, match="pip install -e '.\\[wandb\\]' in posleak's clone"):
        train(build(tiny_overrides(log__wandb=True)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_that_failed_before_its_first_step_can_be_started_again(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ConnectionError("wandb could not start")

    monkeypatch.setattr(tracking, "open_run", broken)
    cfg = build(tiny_overrides(log__wandb=True, train__steps=3))
    with pytest.raises(ConnectionError):
        train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "config.toml").exists()
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert train(cfg, tmp_path / "run")["steps"] == 3  # not refused as an existing run
