"""posleak: where does absolute position come from in a decoder told only relative offsets?"""

from importlib import metadata
from pathlib import Path

# In a checkout, posleak.model (data, train, analysis) is the top-level folder model/ (the
# installed wheel maps the folders under posleak/, see pyproject.toml). The repository root
# joins this package's search path only when it is a posleak checkout.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "model" / "decoder.py").is_file():
    __path__.append(str(_CHECKOUT))


def version() -> str:
    """The installed posleak version (written into env.json, summaries and reports)."""
    try:
        return metadata.version("posleak")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
