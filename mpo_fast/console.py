"""How a command ends: a user's mistake is one line and a non-zero exit, a bug is a traceback.

A user's mistake is what the library reports as `ValueError` (a bad setting or input; the
message names it and what was expected), `OSError` (a missing file, no permission, a full disk),
`ImportError` (an optional package that is not installed) or `RunError` (a run that stopped for
a reason the user acts on: a folder another run holds, a checkpoint that cannot be trusted,
steps that stay non-finite). Anything else is a bug in mpo-fast and keeps its traceback for the
report. `--debug` anywhere on the command line (or
MPO_FAST_DEBUG=1) keeps every traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["USER_ERRORS", "RunError", "run_command"]


class RunError(RuntimeError):
    """A run stopped for a reason its message tells the user how to act on."""


USER_ERRORS = (ValueError, OSError, ImportError, RunError)
EXIT_USER_ERROR = 1


def run_command(prog: str, command: Callable[[list[str]], int],
                argv: Sequence[str] | None = None) -> int:
    """``command(argv)`` with ``--debug`` taken out; a user's error becomes one line on stderr
    and exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MPO_FAST_DEBUG") == "1"
    try:
        return command([a for a in argv if a != "--debug"])
    except USER_ERRORS as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
