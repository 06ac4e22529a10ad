"""Checkpoints: atomic, verified, pickle-free.

A checkpoint is a folder checkpoints/step_00000100/ holding model.safetensors,
optimizer.safetensors (every optimizer tensor), state.json (step, hyper-parameters,
RNG states) and manifest.json (the sha256 of each file). It is written into a temporary
folder, every file fsync'ed, then renamed into place, so a crash at any moment leaves
either the complete new checkpoint or none: the previous one is always intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from posleak.files import fsync_path, refuse_link, safe_dir, sha256_file, share
from posleak.train import optim

MODEL_FILE, CONFIG_FILE, OPTIM_FILE, STATE_FILE, MANIFEST = (
    "model.safetensors",
    "config.json",
    "optimizer.safetensors",
    "state.json",
    "manifest.json",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


STEP_NAME = re.compile(r"step_(\d{8})")  # exactly what step_dir writes: nothing else is ours


class CheckpointMismatch(CheckpointError):
    """A checkpoint that verifies but does not fit the model the config builds: the config
    changed, the checkpoint did not break. It is kept, never quarantined."""

    def __init__(self, path: Path, detail: str):
        super().__init__(
            f"{path} verifies but does not fit the model of this config ({detail}); the config "
            "changed since it was written: continue with the run's own config "
            "(posleak train --resume RUN), or train the new config into another --out"
        )
        self.detail = detail


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step of a checkpoint folder named by step_dir."""
    return int(STEP_NAME.fullmatch(Path(path).name).group(1))


def save(root: Path, step: int, model, optimizer, extra: dict, keep: int) -> Path:
    """Write the checkpoint for `step` atomically and keep only the newest `keep`.

    An existing checkpoint for the same step is kept if it verifies, else moved aside and
    rewritten."""
    root = safe_dir(root, "checkpoint folder")
    final = step_dir(root, step)
    if final.exists():
        try:
            verify(final)
            return final
        except CheckpointError as err:
            quarantine(final, err)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:08d}-"))
    share(tmp)
    try:
        save_file(model.weights(), str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(model.config_json())
        tensors, groups = _flatten_optimizer(optimizer.state_dict())
        tensors.update(_rng_tensors())
        save_file(tensors, str(tmp / OPTIM_FILE))
        state = {"step": step, "param_groups": groups, **extra}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        files = (MODEL_FILE, CONFIG_FILE, OPTIM_FILE, STATE_FILE)
        manifest = {name: sha256_file(tmp / name) for name in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in (*files, MANIFEST):
            fsync_path(tmp / name)
        fsync_path(tmp)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first: real folders named exactly as step_dir
    names them (a user's step_N-backup, a link, a temporary folder are not ours)."""
    root = refuse_link(root, "checkpoint folder")
    if not root.is_dir():
        return []
    ours = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and not p.is_symlink()]
    return sorted(p for p in ours if p.is_dir())


def weights_digest(path: Path) -> str | None:
    """The sha256 of a checkpoint's weights as its manifest lists it (None where the manifest
    is missing or damaged): what an analysis of it records, and what reuse compares."""
    try:
        digest = json.loads((Path(path) / MANIFEST).read_text()).get(MODEL_FILE)
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def quarantine(path: Path, reason: Exception) -> Path:
    """Move an unusable checkpoint to checkpoints/corrupt/ (never counted, never pruned)."""
    path = Path(path)
    dest = path.parent / "corrupt" / f"{path.name}-{int(time.time())}"
    if dest.parent.exists() and not dest.parent.is_dir():
        raise FileExistsError(
            f"{dest.parent} is a file, where posleak moves unusable checkpoints (a folder): "
            f"move it away, then resume again ({path} could not be used: {reason})"
        )
    dest.parent.mkdir(exist_ok=True)
    os.rename(path, dest)
    warnings.warn(f"unusable checkpoint moved to {dest}: {reason}", stacklevel=2)
    return dest


def clean_temporaries(root: Path) -> None:
    for p in Path(root).glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> dict:
    """Check the manifest and every file's hash; return state.json's contents."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{manifest_path}: missing, so the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or not {MODEL_FILE, OPTIM_FILE, STATE_FILE} <= set(manifest):
        raise CheckpointError(f"{manifest_path}: does not list the checkpoint's files")
    for name, digest in manifest.items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing")
        if sha256_file(file) != digest:
            raise CheckpointError(
                f"{file}: contents do not match the manifest (corrupt or truncated)"
            )
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: not valid JSON ({err})") from None
    if not isinstance(state, dict) or type(state.get("step")) is not int:
        raise CheckpointError(f"{path / STATE_FILE}: holds no step, so it is not a checkpoint's")
    return state


def load(path: Path, model, optimizer) -> dict:
    """Verify and restore model, optimizer and RNG states; return state.json's contents."""
    state = verify(path)
    weights, tensors = _read(path / MODEL_FILE), _read(path / OPTIM_FILE)
    _load_weights(model, weights, path)
    optim.load(optimizer, _unflatten_optimizer(tensors, state["param_groups"]))
    _restore_rng(tensors)
    return state


def load_latest(root: Path, model, optimizer) -> dict | None:
    """Restore the newest checkpoint that verifies; corrupt ones are moved aside, named. One
    that verifies but does not fit the model raises CheckpointMismatch and stays in place."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load(path, model, optimizer)
        except CheckpointMismatch:
            raise
        except CheckpointError as err:
            quarantine(path, err)
    return None


def load_weights(path: Path, model) -> dict:
    """Restore only the model weights (for analysis); verifies the checkpoint first."""
    state = verify(path)
    _load_weights(model, _read(Path(path) / MODEL_FILE), path)
    return state


# ------------------------------------------------------------------ helpers
def _read(file: Path) -> dict:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None


def _load_weights(model, weights: dict, path: Path) -> None:
    try:
        model.load_weights(weights)
    except ValueError as err:
        raise CheckpointMismatch(path, str(err)) from None


def _flatten_optimizer(sd: dict) -> tuple[dict, list]:
    tensors = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict:
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.torch_cuda.{i}"] = s
    return out


def _restore_rng(tensors: dict) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.torch_cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
