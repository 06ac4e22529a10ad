"""An exclusive lock on a run directory, safe across processes and machines sharing a disk.

The lock is the file `.lock` holding host, pid and time. It is created complete or not at
all: the owner record is written to a private file first and hard-linked into place, which
fails if `.lock` exists. A lock left by a dead process on this host is stale and taken over;
the check and the takeover happen under a kernel lock on `.lock.guard`, so two processes can
never both take over the same stale lock. A lock held on another host is respected.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path

from posleak.files import NOFOLLOW, open_new, refuse_link

MAX_PID = 1 << 22  # Linux's pid_max ceiling: a larger "pid" is not a process


class RunLocked(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard():  # the guard must work now, or release would fail at the end
            pass
        record = self.path.with_name(f".lock.{secrets.token_hex(8)}")
        try:
            with os.fdopen(open_new(record), "w") as f:
                f.write(json.dumps({**self.me, "since": time.time()}))
        except OSError as err:
            record.unlink(missing_ok=True)
            raise RunLocked(f"cannot write the lock file {self.path}: {err.strerror}") from None
        try:
            for _ in range(10):
                try:
                    os.link(record, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    if self._take_over_if_stale(record):
                        self.held = True
                        return
            raise RunLocked(f"could not lock {self.path}: it keeps changing hands")
        finally:
            record.unlink(missing_ok=True)

    def _take_over_if_stale(self, record: Path) -> bool:
        """Under the guard: replace a lock whose owner is provably gone; else raise."""
        with self._guard():
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return False  # released meanwhile: try again
            owner = _parse(text)
            if owner is None:
                raise RunLocked(
                    f"{self.path} holds no readable owner ({text[:60]!r}); if no process uses "
                    f"{self.path.parent}, delete {self.path}"
                )
            if owner["host"] == self.me["host"] and not _alive(owner["pid"]):
                os.replace(record, self.path)  # atomic: the stale owner is gone
                return True
            raise RunLocked(
                f"{self.path.parent} is in use by pid {owner['pid']} on {owner['host']} "
                f"(lock file {self.path}); wait for it to finish, or delete the lock file if "
                "that process is gone"
            )

    @contextlib.contextmanager
    def _guard(self):
        guard = refuse_link(self.path.with_name(".lock.guard"), "lock guard")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_RDWR | NOFOLLOW, 0o644)
        except OSError as err:
            raise RunLocked(
                f"cannot open the lock guard {guard}: {err.strerror}; if no process uses "
                f"{self.path.parent}, delete {guard}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the kernel lock

    def release(self) -> None:
        if not self.held:
            return
        with self._guard():
            owner = _parse(self.path.read_text()) if self.path.exists() else None
            if owner and (owner["host"], owner["pid"]) == (self.me["host"], self.me["pid"]):
                self.path.unlink()
        self.held = False


def holder(run_dir: Path) -> dict | None:
    """The owner of run_dir's lock while it may still hold it ({host, pid, ...}): a live
    process here, or any process on another host (which cannot be checked from here); None
    for no lock, or one whose process here is gone."""
    try:
        owner = _parse((Path(run_dir) / ".lock").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    if owner is None:
        return None  # unreadable: whoever runs it next names it
    if owner["host"] == socket.gethostname() and not _alive(owner["pid"]):
        return None
    return owner


def _parse(text: str) -> dict | None:
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return None
    pid = owner.get("pid") if isinstance(owner, dict) else None
    ok = type(pid) is int and 0 < pid < MAX_PID and isinstance(owner.get("host"), str)
    return owner if ok else None
