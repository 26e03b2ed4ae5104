"""`python serve.py ...` from a checkout: the same command as `nemojax-serve` (see `nemojax/cli/serve.py`)."""

import sys

from nemojax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
