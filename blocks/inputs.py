"""Checks of input values that every system shares: times must be aware and not in the future."""

from __future__ import annotations

from datetime import datetime, timezone

from blocks.errors import InvalidInput


def require_aware(name: str, moment: datetime) -> datetime:
    """Refuse a naive time, naming the parameter and value."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidInput(f"{name} {moment.isoformat()} has no time zone; add an offset such as +00:00")
    return moment


def refuse_future(name: str, moment: datetime, now: datetime | None = None) -> None:
    """Refuse a time later than now, naming the parameter and both values."""
    now = now or datetime.now(timezone.utc)
    if moment > now:
        raise InvalidInput(f"{name} {moment.isoformat()} is in the future (now {now.isoformat()})")
