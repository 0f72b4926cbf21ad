"""`python -m mpo_fast.pairs ...`: the `mpo-fast pairs` command."""

import sys

from .cli import main

sys.exit(main())
