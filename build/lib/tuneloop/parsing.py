"""Number checks for text from outside (URLs, headers, model names, config strings).

`str.isdigit()` is true for '²' and other Unicode digits that `int()` refuses, so a check built on it lets
`model: "sentiment@²"` through to an `int()` that raises: a 500 for what is a client's typo. Only ASCII digits
count here.
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def is_integer(text: str) -> bool:
    """True for a non-negative integer written in ASCII digits."""
    return _INTEGER.fullmatch(text) is not None


def is_decimal(text: str) -> bool:
    """True for a non-negative number written in ASCII digits, with an optional fraction."""
    return _DECIMAL.fullmatch(text) is not None
