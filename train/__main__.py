"""python -m train CONFIG [--set key=value ...] [--out DIR] [--resume]"""

import sys

from train.cli import main

sys.exit(main())
