"""`python -m interp ...` runs the `interp` command (and `torchrun -m interp ...` runs it on every rank)."""

import sys

from .cli import main

sys.exit(main())
