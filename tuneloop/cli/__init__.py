"""The `tuneloop` command line: a thin layer that parses, calls a workflow function and prints.

Errors raised as TuneloopError subclasses are caught once here and printed as `error: ...` with the error
type's exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from tuneloop.cli.app import app
from tuneloop.errors import TuneloopError


def main() -> None:
    try:
        app()
    except TuneloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
