"""The one text form of a point in time in meshtrust's outputs: RFC 3339, UTC, whole
seconds, ending in ``Z`` (``2026-12-01T22:04:45Z``), as Envoy and istioctl print them."""

from __future__ import annotations

import datetime as dt

__all__ = ["format_timestamp", "parse_timestamp"]

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_timestamp(t: dt.datetime) -> str:
    """``t`` (aware; naive is taken as UTC) as ``YYYY-MM-DDTHH:MM:SSZ``."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).strftime(TIME_FORMAT)


def parse_timestamp(text: object) -> dt.datetime | None:
    """An ISO 8601 / RFC 3339 time (``Z`` or an offset; none means UTC), or None when
    ``text`` is not one."""
    if not isinstance(text, str):
        return None
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)
