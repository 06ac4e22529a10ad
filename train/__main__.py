"""python -m train CONFIG [--set key=value ...] [--out DIR] [--resume]"""

import sys

from posleak.cli import standalone
from train.cli import add_arguments, run

sys.exit(standalone(__doc__, "python -m train", add_arguments, run))
