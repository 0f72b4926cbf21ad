"""`python -m mpo_fast ...` is the `mpo-fast` command (mpo_fast/cli.py)."""

import sys

from .cli import main

sys.exit(main())
