"""`posleak export RUN --format hf --out DIR`: a run's model as a `transformers` checkpoint;
`posleak export RUN --format gguf --quant Q4_0 --out FILE.gguf`: as a llama.cpp GGUF file,
its matrices quantised with the gguf package (to measure what quantisation does to the
measurements of a model whose float weights we have; the pretrained GGUFs ship only Q4).

RoPE and NTK-scaled RoPE models map one to one onto Llama (the effective base b' becomes
`rope_theta`: NTK at a fixed scale is plain RoPE with another base); a sliding-window model
onto Mistral (`sliding_window` = w keys including the query, as in posleak). Parameter names
are already Llama's. NoPE, the learned table and sink logits have no faithful transformers
architecture and are refused. A byte-vocabulary model also gets a fast tokenizer that maps
bytes to the same ids and prepends BOS when the run trained with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from posleak.data import ByteTokenizer
from posleak.data.batches import SYNTHETIC
from posleak.files import (
    refuse_link,
    remove_stale_temporaries,
    safe_dir,
    share,
    temporary_prefix,
)
from posleak.model import Decoder
from posleak.train.config import RunConfig
from posleak.train.rundir import RunDir


class ExportError(ValueError):
    """A model that no transformers architecture expresses, or a missing extra."""


def refusal(model: Decoder) -> str | None:
    """Why this model cannot be written as a transformers checkpoint, or None."""
    cfg = model.cfg
    if not cfg.scheme.exportable:
        return (
            f"position={cfg.position!r} has no faithful transformers architecture (Llama and "
            "Mistral apply RoPE in every layer); export supports rope and rope_ntk models"
        )
    if cfg.sink != "none":
        return f"sink={cfg.sink!r} has no counterpart in Llama or Mistral; export a sink-free model"
    if cfg.attention != "softmax" or cfg.gate:
        what = f"attention={cfg.attention!r}" if cfg.attention != "softmax" else "gate=true"
        return f"{what} has no counterpart in Llama or Mistral; export a softmax, ungated model"
    return None


def hf_config(model: Decoder, special: dict, train_len: int | None = None):
    """The Llama (full causal) or Mistral (sliding window) config of a posleak model;
    max_position_embeddings is the training length (what the model has seen)."""
    import transformers

    cfg = model.cfg
    shared = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ff_width,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        head_dim=cfg.d_head,
        hidden_act="silu",
        max_position_embeddings=train_len or cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_effective_base},
        **special,
    )
    if cfg.window is None:
        return transformers.LlamaConfig(architectures=["LlamaForCausalLM"], **shared)
    return transformers.MistralConfig(
        architectures=["MistralForCausalLM"], sliding_window=cfg.window, **shared
    )


def hf_weights(model: Decoder) -> dict:
    """posleak's Llama-named tensors under transformers' prefixes (the head stays on top)."""
    return {
        (name if name == "lm_head.weight" else f"model.{name}"): tensor
        for name, tensor in model.weights().items()
    }


def write_tokenizer(out: Path, bos: bool) -> None:
    """A fast byte-level tokenizer with posleak's ids: byte b -> b, then BOS, EOS, PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in enumerate(byte_level_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>", "<pad>"]
    tok.add_special_tokens(specials)  # ids 256, 257, 258 as in ByteTokenizer
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", ByteTokenizer().bos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(out)


def byte_level_chars() -> list[str]:
    """The printable character byte-level BPE (GPT-2's convention) stands for each byte:
    printable Latin-1 bytes stand for themselves, the others for U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def export_hf(run: str | Path, out: str | Path) -> Path:
    if importlib.util.find_spec("transformers") is None:
        raise ExportError("export needs transformers: pip install -e '.[hf]' in posleak's clone")
    out = Path(out)
    check_out(Path(run), out)
    model, cfg, state = RunDir(run).load_model()
    why = refusal(model)
    if why:
        raise ExportError(f"cannot export {run}: {why}")
    bytes_vocab = _byte_vocabulary(cfg, model)
    special = _special_ids() if bytes_vocab else {}
    safe_dir(out.parent, "--out's folder")  # made if missing, as a run's folder is
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temporary_prefix(out)))
    try:
        hf_config(model, special, cfg.data.seq_len).save_pretrained(tmp)
        save_file(hf_weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if bytes_vocab:
            write_tokenizer(tmp, bos=cfg.data.bos == "always")
        if special:
            import transformers

            transformers.GenerationConfig(**special).save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(Path(run), model, cfg, state))
        names = sorted(entry.name for entry in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps(names) + "\n")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_out(run: Path, out: Path) -> None:
    """--out must not be inside the run (its checkpoints would be overwritten) and must be
    new, empty, or an earlier export holding only what that export wrote (its manifest lists
    them): a re-export replaces the folder, so a file the user added there would be lost."""
    inside = out.resolve().is_relative_to(run.resolve())
    if inside:
        raise ExportError(
            f"--out {out} is inside the run {run}; export next to the run, e.g. --out "
            f"{run.parent / (run.name + '-hf')}"
        )
    refuse_link(out, "--out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder for the checkpoint")
    if out.is_dir():
        foreign = sorted({entry.name for entry in out.iterdir()} - exported_files(out))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ExportError(
                f"--out {out} holds files no earlier posleak export wrote there ({shown}); a "
                "re-export replaces the folder: move them out, or give a new or empty folder"
            )


def exported_files(out: Path) -> set[str]:
    """The names an earlier export wrote into `out` (its manifest and what it lists); none
    when there is no readable manifest."""
    try:
        names = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return set()
    return {MANIFEST, *names}


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into place: a reader sees the old export or the new one."""
    for path in (tmp, *tmp.rglob("*")):
        share(path)
    old = out.with_name(temporary_prefix(out) + "replaced")  # a kill next: stale, removed
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


MANIFEST = ".posleak-export"  # the names of the files an export wrote (JSON list)


def model_card(run: Path, model: Decoder, cfg: RunConfig, state: dict) -> str:
    """README.md of the export: what was trained, on what, and how it encodes position."""
    m = model.cfg
    scheme = f"RoPE, base {m.params['base']:g}"
    if m.position == "rope_ntk":
        scheme = (
            f"NTK-scaled RoPE, s = {m.params['scale']:g} (effective base "
            f"{model.rope_effective_base:g})"
        )
    if m.window is not None:
        scheme += f", sliding window of {m.window} keys (Mistral)"
    loss = (RunDir(run).summary() or {}).get("final_val_loss")
    tags = ["posleak", m.position.replace("_", "-"), *(["sliding-window"] if m.window else [])]
    lines = [  # the YAML header model hubs index, then the card
        "---",
        "license: mit",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        "",
        f"# {run.name}: a posleak decoder",
        "",
        "A small decoder-only transformer trained with posleak (a testbed for where absolute "
        "position comes from in a decoder told only relative offsets), exported as a "
        "transformers checkpoint.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, SwiGLU "
        f"{m.ff_width}, RMSNorm, no biases |",
        f"| position | {scheme} |",
        f"| data | `{cfg.data.source}`, {cfg.data.seq_len} tokens per sequence, BOS "
        f"{cfg.data.bos} |",
        f"| vocabulary | {m.vocab_size} |",
        f"| training | {state.get('step')} steps of {cfg.train.batch_size} sequences, AdamW lr "
        f"{cfg.train.lr:g}, seed {cfg.seed} |",
        f"| validation loss | {'–' if loss is None else f'{loss:.4f}'} (nats per token) |",
        "",
        f"Trained at {cfg.data.seq_len} tokens: `max_position_embeddings` says so; longer "
        "inputs run, but the model has not seen them.",
        "",
    ]
    return "\n".join(lines)


def _byte_vocabulary(cfg: RunConfig, model: Decoder) -> bool:
    return cfg.data.source not in SYNTHETIC and (model.cfg.vocab_size == ByteTokenizer().size)


def _special_ids() -> dict:
    tok = ByteTokenizer()
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eos, "pad_token_id": tok.pad}


GGUF_TYPES = ("F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # whole-file types


def export_gguf(run: str | Path, out: str | Path, quant: str) -> Path:
    """The run's model as one GGUF file (architecture llama, posleak's byte tokenizer), every
    matrix whose rows fill whole quantisation blocks in `quant`, norms in F32. q and k rows
    are stored in llama.cpp's order (transformers' GGUF loader undoes it). Written atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise ExportError(
            "a GGUF export needs the gguf package: pip install -e '.[hf]' in posleak's clone"
        )
    import gguf

    if quant not in GGUF_TYPES:
        raise ExportError(f"--quant {quant!r} is not one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf" or out.resolve().is_relative_to(Path(run).resolve()):
        raise ExportError(f"--out {out} must be a .gguf file outside the run")
    refuse_link(out, "--out")
    if out.exists():
        raise ExportError(f"--out {out} exists; give a new file name")
    model, cfg, _ = RunDir(run).load_model()
    why = refusal(model) or (
        f"window={model.cfg.window} has no GGUF counterpart that transformers reads; export a "
        "full-attention model"
        if model.cfg.window is not None
        else None
    )
    if why is None and not _byte_vocabulary(cfg, model):
        why = "only a byte-vocabulary model carries a tokenizer a GGUF file can hold"
    if why:
        raise ExportError(f"cannot export {run}: {why}")
    m, kind = model.cfg, gguf.GGMLQuantizationType[quant]
    safe_dir(out.parent, "--out's folder")  # made if missing, as a run's folder is
    remove_stale_temporaries(out)
    tmp = out.with_name(temporary_prefix(out) + secrets.token_hex(4))
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(Path(run).name)
        writer.add_file_type(gguf.LlamaFileType["ALL_F32" if quant == "F32" else f"MOSTLY_{quant}"])
        writer.add_context_length(cfg.data.seq_len)
        writer.add_embedding_length(m.d_model)
        writer.add_block_count(m.n_layer)
        writer.add_feed_forward_length(m.ff_width)
        writer.add_head_count(m.n_head)
        writer.add_head_count_kv(m.n_head)
        writer.add_rope_dimension_count(m.d_head)
        writer.add_rope_freq_base(model.rope_effective_base)
        writer.add_layer_norm_rms_eps(m.norm_eps)
        _gguf_tokenizer(writer, bos=cfg.data.bos == "always")
        for name, tensor in _gguf_tensors(model):
            data = tensor.detach().float().numpy()
            block = gguf.GGML_QUANT_SIZES[kind][0]
            if data.ndim == 2 and data.shape[1] % block == 0 and quant != "F32":
                writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
            else:
                writer.add_tensor(name, data)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except OSError as err:  # numpy says "1024 requested and 184 written" on a full disk
            raise ExportError(
                f"writing {out} stopped ({err.strerror or err}): is {out.parent}'s disk full? "
                "Free some space and export again; nothing was written"
            ) from None
        share(tmp)
        try:  # published only where nothing appeared meanwhile (another export, say)
            os.link(tmp, out)
        except FileExistsError:
            raise ExportError(
                f"--out {out} appeared while this export ran (another export?); it is left as "
                "it is and this export was discarded: give a new file name"
            ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _gguf_tokenizer(writer, bos: bool) -> None:
    """posleak's byte ids as a byte-level BPE vocabulary: byte b is token b, then the
    specials (every token is one byte, so there is nothing to merge)."""
    tok = ByteTokenizer()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*byte_level_chars(), "<bos>", "<eos>", "<pad>"])
    writer.add_token_types([1] * 256 + [3] * 3)  # normal, then control
    writer.add_token_scores([0.0] * tok.size)  # no merges: a reader derives none from these
    writer.add_bos_token_id(tok.bos)
    writer.add_eos_token_id(tok.eos)
    writer.add_pad_token_id(tok.pad)
    writer.add_add_bos_token(bos)


def _gguf_tensors(model: Decoder):
    """(GGUF name, tensor) of every weight; q and k rows permuted as llama.cpp stores them."""
    m = model.cfg

    def permuted(w):
        return w.reshape(m.n_head, 2, m.d_head // 2, -1).transpose(1, 2).reshape(w.shape)

    yield "token_embd.weight", model.embed_tokens.weight
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", permuted(attn.q_proj.weight)
        yield f"blk.{i}.attn_k.weight", permuted(attn.k_proj.weight)
        yield f"blk.{i}.attn_v.weight", attn.v_proj.weight
        yield f"blk.{i}.attn_output.weight", attn.o_proj.weight
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        yield f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight
        yield f"blk.{i}.ffn_up.weight", mlp.up_proj.weight
        yield f"blk.{i}.ffn_down.weight", mlp.down_proj.weight
    yield "output_norm.weight", model.norm.weight
    if not m.tie_embeddings:
        yield "output.weight", model.lm_head.weight
