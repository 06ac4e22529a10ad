"""python -m posleak SUBCOMMAND ...

`python -m` puts the working directory first on sys.path, where a user's own train.py or
model.py (a nanoGPT checkout, say) would shadow posleak's packages; it is dropped here, since
posleak itself is already imported and its packages are installed.
"""

import os
import sys

sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

from posleak.cli import main  # noqa: E402

sys.exit(main())
