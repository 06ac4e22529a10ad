"""File primitives every layer shares: atomic writes and content hashes.

An atomic write goes to a private temporary file in the same folder, is fsync'ed, then
renamed over the target: a reader sees the old contents or the new, never a mixture, and
concurrent writers (sweep runners, distributed ranks) never share a temporary file.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
