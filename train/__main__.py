"""python -m train CONFIG [--set key=value ...] [--out DIR] [--resume]: `posleak train`."""

import sys

from posleak.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
