"""The `tuneloop` command line: a thin layer that parses, calls a workflow function and prints.

Errors raised as TuneloopError subclasses are caught once here and printed as `error: ...` with the error
type's exit code (under `--json`, as a JSON object on stdout, so a script parsing the output gets the error in
the same shape); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys

from tuneloop.cli.app import app
from tuneloop.errors import TuneloopError


def main() -> None:
    try:
        app()
    except TuneloopError as exc:
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc),
                                        "exit_code": exc.exit_code}}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
