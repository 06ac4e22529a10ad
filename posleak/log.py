"""posleak's log: progress and notes that are not a command's result.

Modules log to the "posleak" logger; the command line shows INFO and above on stderr as plain
lines. Used as a library (a notebook), nothing below WARNING is shown unless the caller asks:
`logging.getLogger("posleak").setLevel(logging.INFO)` plus a handler, or `show()`.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("posleak")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a line is logged (a test's capture,
    a notebook's cell), not to the stream it found when it was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def show(level: int = logging.INFO) -> None:
    """Print posleak's log lines at `level` and above to stderr (the handler is added once)."""
    log.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def clock(seconds: float) -> str:
    """H:MM:SS for a progress line ("?" for a time not known yet: nan)."""
    if seconds != seconds:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
