"""From a run directory to cached activations: load the model, draw held-out sequences,
run forward passes that keep only what each measurement reads."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from data import BatchStream, DataConfig
from model import Decoder
from train import checkpoint
from train.config import RunConfig, from_resolved, tomllib


def load_run(run_dir: str | Path) -> tuple[Decoder, RunConfig, dict]:
    """The model at the run's latest good checkpoint, its config and the checkpoint state."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = from_resolved(run_dir / "config.toml")
    resolved_model = tomllib.loads((run_dir / "config.toml").read_text())["model"]
    model = Decoder(cfg.model_config(resolved_model["vocab_size"]))
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet; train it first")
    errors = []
    for path in reversed(ckpts):
        try:
            state = checkpoint.load_weights(path, model)
            break
        except checkpoint.CheckpointError as err:
            errors.append(str(err))
    else:
        raise checkpoint.CheckpointError("no usable checkpoint: " + "; ".join(errors))
    model.eval()
    return model, cfg, {**state, "checkpoint": str(path)}


def run_label(run_dir: Path, cfg: RunConfig) -> dict:
    """variant and seed of a run: the sweep's variant name if it has one, else from config."""
    sweep = Path(run_dir) / "sweep.json"
    if sweep.exists():
        info = json.loads(sweep.read_text())
        return {"variant": info["variant"], "seed": info["seed"]}
    m = cfg.model
    name = m.get("position", "rope")
    if m.get("window"):
        name += f"+w{m['window']}"
    if m.get("sink", "none") != "none":
        name += f"+sink_{m['sink']}"
    return {"variant": name, "seed": cfg.seed}


def held_out_tokens(
    data: DataConfig, seed: int, n: int, seq_len: int, bos: str, stream: str = "analysis"
) -> torch.Tensor:
    """n validation-split sequences of seq_len tokens from a stream of their own, so they
    never coincide with the batches used for evaluation during training."""
    cfg = dataclasses.replace(data, seq_len=seq_len, bos=bos)
    return BatchStream(cfg, seed, "val", n, stream=stream).batch(0)[:, :seq_len]


@torch.no_grad()
def collect(
    model: Decoder,
    tokens: torch.Tensor,
    extract: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batch_size: int = 32,
    interventions: list = (),
) -> dict[str, torch.Tensor]:
    """Run `tokens` through the model in mini-batches; for each hook name keep
    extract[name](activation) (e.g. only column 0 of a pattern), concatenated over batches."""
    parts: dict[str, list] = {name: [] for name in extract}

    def keeper(tensor, name):
        parts[name].append(extract[name](tensor.detach()).float().cpu())

    with model.hooks([*interventions, *((name, keeper) for name in extract)]):
        for start in range(0, len(tokens), batch_size):
            model(tokens[start : start + batch_size])
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def first_key_column(pattern: torch.Tensor) -> torch.Tensor:
    return pattern[..., 0]  # (B, H, T): A_i0


def position_zero(resid: torch.Tensor) -> torch.Tensor:
    return resid[:, 0]  # (B, d)
