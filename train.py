"""`python train.py ...` from a checkout: the same command as `nemojax-train` (see `nemojax/cli/train.py`)."""

import sys

from nemojax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
