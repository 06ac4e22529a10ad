"""File primitives every layer shares: atomic writes that never follow links, and hashes.

An atomic write goes to a fresh temporary file in the same folder (created with O_EXCL and
O_NOFOLLOW under an unpredictable name, so a planted file or link there is never written
through), is fsync'ed, then renamed over the target: a reader sees the old contents or the
new, never a mixture, and concurrent writers never share a temporary file. A target that is
a symbolic link, or a folder on the way that is one, is refused: whoever can write into a
run folder must not be able to redirect our writes elsewhere.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafePath(OSError):
    """A path we would write through that is a symbolic link (or not what it should be)."""


def refuse_link(path: str | Path, what: str = "path") -> Path:
    """`path`, unless it is a symbolic link (then UnsafePath names it and the fix)."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePath(
            f"{what} {path} is a symbolic link; posleak writes only into real files and "
            "folders: replace the link with a folder or file of its own"
        )
    return path


def safe_dir(path: str | Path, what: str = "folder") -> Path:
    """Create folder `path` (and its parents) if needed; refuse it if it is a link."""
    path = refuse_link(path, what)
    if path.exists() and not path.is_dir():
        raise UnsafePath(f"{what} {path} is a file, not a folder; give a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


OWNED = ".posleak-output"  # the marker of an output folder posleak made


def check_owned(path: str | Path, what: str, ours_already=None) -> Path:
    """Refuse, before any work, an output folder that holds files posleak did not write: it
    writes only into a new or empty folder, or one that carries its marker (or that
    `ours_already(path)` recognises as an earlier output of its own)."""
    path = refuse_link(path, what)
    if path.exists() and not path.is_dir():
        raise UnsafePath(f"{what} {path} is a file, not a folder; give a folder")
    if path.is_dir() and not (path / OWNED).exists():
        marking = f".{OWNED}.tmp-"  # another posleak process marking this folder right now
        foreign = sorted(e.name for e in path.iterdir() if not e.name.startswith(marking))
        if foreign and not (ours_already and ours_already(path)):
            raise UnsafePath(
                f"{what} {path} holds files posleak did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder"
            )
    return path


def owned_dir(path: str | Path, what: str, ours_already=None) -> Path:
    """check_owned, then the folder created (parents too) and marked as posleak's."""
    path = check_owned(path, what, ours_already)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / OWNED).exists():
        atomic_write(path / OWNED, "an output folder of posleak's: it rewrites only its own\n")
    return path


def open_new(path: str | Path, mode: int = 0o644) -> int:
    """A file descriptor of a newly created file (never an existing one, never via a link)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)


def regular_target(path: str | Path, what: str = "file") -> Path:
    """`path` as the target of an atomic write, refused before any work if it is a link or
    exists as something other than a regular file (a device such as /dev/null, a FIFO, a
    socket, a folder): the final rename would replace it with a regular file."""
    path = refuse_link(path, what)
    if path.exists() and not path.is_file():
        raise UnsafePath(
            f"{what} {path} exists and is not a regular file (a device, FIFO, socket or "
            "folder); posleak replaces only files: give the path of a file"
        )
    return path


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` atomically (regular_target says what is refused)."""
    path = regular_target(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    fd = open_new(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_append(path: str | Path):
    """A text file opened for appending, refused if it is a link (created if absent)."""
    path = refuse_link(path, "file")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
    return os.fdopen(fd, "a")


def share(path: str | Path) -> None:
    """Give a folder made by mkdtemp (0700) or a file by mkstemp (0600) the modes the umask
    gives ordinary ones, so that runs and exports are readable on a shared disk."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


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


STALE_SECONDS = 600  # a temporary nobody has written for this long, of a dead process, is left over


def temporary_prefix(target: str | Path) -> str:
    """The name prefix of a large temporary for `target` (an export, a cache entry), in its
    folder: it carries this process's pid, so that one a killed process left can be told from
    one being written (remove_stale_temporaries)."""
    return f".{Path(target).name}.tmp-{os.getpid()}-"


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Delete the temporaries of `target` that a process killed mid-write left (SIGKILL runs
    no cleanup): named by temporary_prefix, their pid not running on this machine, and
    nothing in them written for STALE_SECONDS (a writer on another machine sharing the folder
    keeps writing). Returns what was removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-")
    removed = []
    for entry in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        found = pattern.match(entry.name)
        if not found or _running(int(found.group(1))) or _idle(entry) < STALE_SECONDS:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid: not ours to judge
    return True


def _idle(entry: Path) -> float:
    """Seconds since anything in entry (a file, or a folder and the files in it) changed."""
    try:
        times = [entry.lstat().st_mtime]
        if entry.is_dir() and not entry.is_symlink():
            times += [child.lstat().st_mtime for child in entry.iterdir()]
    except FileNotFoundError:
        return 0.0
    return time.time() - max(times)
