"""Test settings: one torch thread per pytest worker so that parallel workers share the cores."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.d_model": 32,
    "data.source": "markov",
    "data.vocab_size": 20,
    "data.seq_len": 32,
    "train.steps": 12,
    "train.batch_size": 4,
    "train.warmup": 2,
    "train.eval_every": 4,
    "train.eval_batches": 2,
    "train.ckpt_every": 4,
    "train.log_every": 1,
    "train.precision": "fp32",
    "train.device": "cpu",
    "log.progress": False,
}


def tiny_overrides(**changes) -> dict:
    """A config small enough for a test to train in about a second; `a__b=v` sets a.b."""
    return {**TINY, **{key.replace("__", "."): value for key, value in changes.items()}}


def write_config(path, values: dict):
    """Write flat dotted values as a TOML config file."""
    import tomli_w

    nested: dict = {}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    path.write_text(tomli_w.dumps(nested))
    return path


def blank_one_head_model(**config):
    """A one-layer, one-head Decoder with every weight zero and every norm weight one: a
    planted-model test writes the few weights its closed form needs into it."""
    from posleak.model import Decoder, ModelConfig

    model = Decoder(ModelConfig(n_layer=1, n_head=1, **config))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.norm.weight.fill_(1.0)
        model.layers[0].input_layernorm.weight.fill_(1.0)
        model.layers[0].post_attention_layernorm.weight.fill_(1.0)
    return model
