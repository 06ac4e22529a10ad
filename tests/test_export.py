"""Export to transformers: a trained run loaded by transformers gives posleak's logits, and the
byte tokenizer gives posleak's ids."""

import pytest
import torch
from conftest import tiny_overrides

from posleak.cli import main
from posleak.data import ByteTokenizer
from posleak.train.config import build
from posleak.train.export import ExportError, export_gguf, export_hf
from posleak.train.loop import train
from posleak.train.rundir import RunDir

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

EXPORTABLE = {
    "rope": dict(model__position="rope"),
    "ntk": dict(model__position="rope_ntk", model__params__scale=4.0),
    "window": dict(model__position="rope", model__window=5),
    "tied": dict(model__position="rope", model__tie_embeddings=True),
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_exported_model_gives_posleak_logits_in_transformers(tmp_path, name):
    run = tmp_path / "run"
    train(build(tiny_overrides(**EXPORTABLE[name])), run)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _, _ = RunDir(run).load_model()
    expected = "MistralForCausalLM" if name == "window" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    tokens = torch.randint(0, 20, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert torch.allclose(theirs, ours(tokens), atol=1e-5), (theirs - ours(tokens)).abs().max()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(model__position="nope"),
        dict(model__sink="learned"),
        dict(model__attention="softpick"),
        dict(model__gate=True),
    ],
    ids=["nope", "sink", "softpick", "gate"],
)
def test_variants_without_a_faithful_architecture_are_refused_in_one_line(
    tmp_path, overrides, capsys
):
    train(build(tiny_overrides(**overrides)), tmp_path / "run")
    with pytest.raises(ExportError, match="export supports|sink-free|softmax, ungated"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    with pytest.raises(ExportError, match="export supports|sink-free|softmax, ungated"):
        export_gguf(tmp_path / "run", tmp_path / "model.gguf", "F32")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_byte_tokenizer_maps_bytes_to_posleak_ids_and_prepends_bos(tmp_path):
    from posleak.train.export import write_tokenizer

    write_tokenizer(tmp_path, bos=True)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "In the beginning, Gott schuf — ∂x ☃\n"
    ours = ByteTokenizer()
    assert hf(text)["input_ids"] == [ours.bos, *ours.encode(text).tolist()]
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (256, 257, 258)


def test_a_text_run_exports_with_its_tokenizer(tmp_path):
    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible")), run)
    out = export_hf(run, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _, _ = RunDir(run).load_model()
    ids = tokenizer("And God said", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == hf.config.bos_token_id == ByteTokenizer().bos
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)
    from huggingface_hub import ModelCard  # the hub's own reader of the card's header

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.tags == ["posleak", "rope"] and "# run: a posleak decoder" in card.text


def test_a_gguf_export_reads_back_as_its_weights_quantised_by_the_gguf_package(tmp_path):
    """`posleak export --format gguf`: at F32 the file loads (through transformers' GGUF
    reader, as a pretrained subject) to posleak's own logits and byte ids; at Q4_0 to the
    logits of posleak's model whose matrices went through gguf.quants by hand, and at F16
    likewise."""
    gguf = pytest.importorskip("gguf", reason="the hf extra is not installed")
    from posleak.analysis.engine.analyze import Options, analysis_of

    run = tmp_path / "run"
    overrides = tiny_overrides(data__source="bible", model__position="rope_ntk")
    train(build({**overrides, "model.params.scale": 2.0}), run)
    ours, _, _ = RunDir(run).load_model()
    tokens = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(3))
    opts = Options(seqs=4, seq_len=16)
    for quant in ("F32", "F16", "Q4_0"):  # F16 once failed with KeyError: ALL_F16
        path = tmp_path / f"run-{quant}.gguf"
        assert (
            main(["export", str(run), "--format", "gguf", "--quant", quant, "--out", str(path)])
            == 0
        )
        analysis = analysis_of(f"hf:{path}", opts)
        assert analysis.subject.info["quantisation"] == quant
        expected, _, _ = RunDir(run).load_model()
        if quant != "F32":
            kind = gguf.GGMLQuantizationType[quant]
            block = gguf.GGML_QUANT_SIZES[kind][0]
            with torch.no_grad():
                for weight in expected.parameters():
                    if weight.ndim == 2 and weight.shape[1] % block == 0:
                        rounded = gguf.quants.dequantize(
                            gguf.quants.quantize(weight.numpy(), kind), kind
                        )
                        weight.copy_(torch.from_numpy(rounded))
        with torch.no_grad():
            got, want = analysis.model(tokens), expected(tokens)
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        if quant == "Q4_0":  # the rounding is real: it moves the logits
            assert not torch.allclose(got, ours(tokens), atol=1e-3)
    drawn = analysis.tokens(2, 16, "check", bos="always")
    assert drawn[:, 0].eq(ByteTokenizer().bos).all() and drawn[:, 1:].lt(256).all()
    assert main(["export", str(run), "--format", "gguf", "--quant", "Q3", "--out", str(path)]) == 2


def test_a_re_export_replaces_only_an_earlier_export_and_never_a_users_files(tmp_path):
    """A re-export swaps the whole folder, so it is refused where the folder holds anything
    an earlier export did not write (its manifest lists what it did), and the files stay."""
    run = tmp_path / "run"
    train(build(tiny_overrides(model__position="rope")), run)
    out = export_hf(run, tmp_path / "hf")
    assert export_hf(run, out) == out  # an untouched earlier export is replaced
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(ExportError, match="NOTES.md"):
        export_hf(run, out)
    assert (out / "NOTES.md").read_text() == "mine" and (out / "model.safetensors").exists()
    marked = tmp_path / "marked"  # a README that only looks like an export's
    marked.mkdir()
    (marked / "README.md").write_text((out / "README.md").read_text())
    (marked / "data.csv").write_text("1,2")
    with pytest.raises(ExportError, match="README.md, data.csv"):
        export_hf(run, marked)
    assert sorted(p.name for p in marked.iterdir()) == ["README.md", "data.csv"]


def test_a_gguf_export_never_publishes_over_a_file_that_appeared_while_it_ran(
    tmp_path, monkeypatch
):
    """Two exports to one new name: the one that finishes second is refused, not printed as
    exported over the first one's file."""
    gguf = pytest.importorskip("gguf", reason="the hf extra is not installed")
    from posleak.train.export import export_gguf

    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible")), run)
    out = tmp_path / "model.gguf"
    close = gguf.GGUFWriter.close

    def racing_close(writer):  # the other export lands first
        close(writer)
        out.write_bytes(b"the other export")

    monkeypatch.setattr(gguf.GGUFWriter, "close", racing_close)
    with pytest.raises(ExportError, match="appeared while this export ran"):
        export_gguf(run, out, "F32")
    assert out.read_bytes() == b"the other export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []


def test_a_full_disk_during_a_gguf_export_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, capsys
):
    """numpy reports a short write as "1024 requested and 184 written": the export says which
    file, that the disk may be full, and leaves neither the file nor its temporary."""
    gguf = pytest.importorskip("gguf", reason="the hf extra is not installed")

    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible")), run)

    def full(writer, *args, **kwargs):
        raise OSError("1024 requested and 184 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = tmp_path / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"writing {out} stopped (1024 requested and 184 written)" in err and "disk full" in err
    assert [p.name for p in tmp_path.iterdir() if "model" in p.name] == []


def test_what_a_killed_export_left_is_removed_by_the_next_one_and_nothing_else(tmp_path):
    """SIGKILL runs no cleanup: the next export removes the temporaries of a process that no
    longer runs and that nobody has written for STALE_SECONDS; a live writer's, a fresh one
    and a user's files stay."""
    import os
    import subprocess
    import sys
    import time

    from posleak.files import STALE_SECONDS

    run = tmp_path / "run"
    train(build(tiny_overrides(model__position="rope")), run)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid now runs nothing
    old = time.time() - 2 * STALE_SECONDS

    def planted(name: str, age: float | None) -> object:
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 1000)
        if age is not None:
            for p in (path / "model.safetensors", path):
                os.utime(p, (age, age))
        return path

    killed = planted(f".hf.tmp-{child.pid}-ab12", old)
    fresh = planted(f".hf.tmp-{child.pid}-cd34", None)
    live = planted(f".hf.tmp-{os.getpid()}-ef56", old)
    users = planted(".hf.tmp-notes", old)
    export_hf(run, tmp_path / "hf")
    assert not killed.exists()
    assert fresh.exists() and live.exists() and users.exists()


def test_an_export_into_a_folder_that_does_not_exist_yet_makes_it(tmp_path):
    """As `train --out` does; before, the error named the export's temporary file."""
    run = tmp_path / "run"
    train(build(tiny_overrides(data__source="bible")), run)
    out = export_hf(run, tmp_path / "new" / "deeper" / "hf")
    assert (out / "model.safetensors").is_file()
    pytest.importorskip("gguf", reason="the hf extra is not installed")
    from posleak.train.export import export_gguf

    assert export_gguf(run, tmp_path / "other" / "m.gguf", "F32").is_file()
