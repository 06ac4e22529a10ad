"""Test settings: one torch thread per pytest worker so that parallel workers share the cores."""

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from posleak.analysis.engine.analyze import Options, analysis_of
from posleak.analysis.engine.collect import stream
from posleak.analysis.stages import stage
from posleak.model import Decoder, ModelConfig
from posleak.train.config import build
from posleak.train.loop import TIMING_FIELDS, train

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


def collect(  # what a test reads of the activations: the library streams them
    model: torch.nn.Module,
    tokens: torch.Tensor,
    extract: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batch_size: int = 32,
    interventions: list = (),
) -> dict[str, torch.Tensor]:
    """For each hook name keep extract[name](activation), concatenated over sequences."""
    parts: dict[str, list] = {name: [] for name in extract}

    def keeper(name):
        return lambda tensor, rows: parts[name].append(extract[name](tensor).float().cpu())

    stream(model, tokens, {name: keeper(name) for name in extract}, batch_size, interventions)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def deterministic_metrics(path: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields: what must match across resumes and reruns."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train(build(tiny_overrides()), run)
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 12-step run (checkpoints at 8 and 12) to copy; never modified."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "tiny.toml", tiny_overrides())
    train(build(tiny_overrides()), root / "run")
    return config, root / "run"


# ------------------------------------------------------------------ analysis tests
ROOT = Path(__file__).resolve().parent.parent


SMALL = Options(
    seqs=16, fingerprint_seqs=4, early_k=(4, 8), batch_size=8, extrapolation_seqs=4, bootstrap=50
)


def tiny_model(**overrides) -> Decoder:
    base = dict(vocab_size=23, n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    return Decoder(ModelConfig(**{**base, **overrides}))


def uniform_tokens(n=32, T=24, vocab=20, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for variant in ("rope", "nope"):
        for seed in (0, 1):
            cfg = build(tiny_overrides(model__position=variant, seed=seed, train__steps=6))
            out = root / f"{variant}-s{seed}"
            train(cfg, out)
            (out / "sweep.json").write_text(json.dumps({"variant": variant, "seed": seed}))
    return root


def parked_with_flat_logits(run):
    """The run's analysis with every query zeroed (flat logits) and the mass on no key that
    the signatures stage then records, per head."""
    analysis = analysis_of(run, SMALL)
    with torch.no_grad():
        for block in analysis.model.layers:
            block.self_attn.q_proj.weight.zero_()
    ctx = analysis.context(analysis.tokens(8, analysis.T, "analysis"))
    stage("sink signatures").run(analysis, ctx)
    return analysis, [r["value"] for r in analysis.rec.rows if r["metric"] == "sink_virtual_mass"]
