"""posleak: where does absolute position come from in a decoder told only relative offsets?"""

from importlib import metadata


def version() -> str:
    """The installed posleak version (written into env.json, summaries and reports)."""
    try:
        return metadata.version("posleak")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
