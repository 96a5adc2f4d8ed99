"""Parsing the instants users type: ISO dates/times or ages such as 7d, 12h, 30m (UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from tuneloop.errors import ConfigError

_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def as_utc(value: datetime) -> datetime:
    """A datetime read back from the store (SQLite drops the offset) as an aware UTC one."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_instant(text: str, what: str = "time", *, now: datetime | None = None) -> datetime:
    """'7d' -> now minus 7 days; '2026-11-01' or '2026-11-01T12:00' -> that instant (UTC unless it says)."""
    text = text.strip()
    match = _AGE.match(text)
    if match:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{what}: '{text}' is neither an ISO date/time nor an age like 7d, 12h, 30m") from None
    return as_utc(parsed)
