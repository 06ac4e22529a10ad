"""python -m posleak SUBCOMMAND ..."""

import sys

from posleak.cli import main

sys.exit(main())
