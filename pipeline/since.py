"""One parser for the time options of the analyst commands (``--since``, ``--until``).

``30m``, ``1h``, ``7d``, ``2w`` count back from ``now``; ``2026-11-01`` is that day's
midnight UTC; ``2026-11-01T08:30``, ``2026-11-01T08:30:00Z`` or with an offset are that
instant (a time without an offset is UTC).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from schemas.avro_binary import micros

__all__ = ["UNITS", "parse_time", "to_micros"]

#: Relative units: seconds, minutes, hours, days, weeks.
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_RELATIVE = re.compile(r"(\d{1,9})\s*([smhdw])")
_EXPECTED = "try 30m, 1h, 7d, 2w or 2026-11-01"


def parse_time(text: str, now: datetime) -> datetime:
    """The instant ``text`` names, in UTC; relative forms count back from ``now``.

    Raises ``ValueError`` with a one-line reason (what was given and what is expected).
    """
    value = text.strip()
    if not value:
        raise ValueError(f"empty: {_EXPECTED}")
    match = _RELATIVE.fullmatch(value.lower())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        try:
            return now.astimezone(UTC) - timedelta(**{UNITS[unit]: amount})
        except OverflowError:
            raise ValueError(f"{text!r} reaches too far back") from None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: {_EXPECTED}") from None
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def to_micros(instant: datetime) -> int:
    """Microseconds since the epoch (how the queries pass instants to ClickHouse)."""
    return micros(instant.astimezone(UTC))
