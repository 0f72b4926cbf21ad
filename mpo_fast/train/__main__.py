"""`python -m mpo_fast.train`: see `mpo_fast.train.cli` (no arguments: the bundled demo)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
