"""`python -m nemojax.eval needle ...`: see `nemojax.eval.cli`."""

import sys

from nemojax.eval.cli import main

sys.exit(main())
