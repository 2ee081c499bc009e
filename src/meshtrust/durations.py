"""Durations as people write them: ``90s``, ``15m``, ``24h``, ``90d`` (and plain seconds)."""

from __future__ import annotations

import datetime as dt
import re

from meshtrust.errors import InvalidDuration

__all__ = ["format_duration", "parse_duration"]

_MAX_SECONDS = 100 * 365 * 86400
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: object, *, what: str = "duration") -> dt.timedelta:
    """Parse ``90s``, ``1h30m``, ``24h``, ``90d`` or a bare number of seconds.

    Raises :class:`InvalidDuration` naming ``what`` for anything else (a list, a mapping, a
    boolean, null ...), and for negative values.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise InvalidDuration(f"{what}: expected a duration like 90s, 15m, 24h or 90d")
    if isinstance(text, int | float):
        if text < 0:
            raise InvalidDuration(f"{what}: must not be negative, got {text}")
        if not text <= _MAX_SECONDS:  # also refuses NaN
            raise InvalidDuration(f"{what}: {text!r} is not a duration between 0 and 100 years")
        return dt.timedelta(seconds=text)
    s = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return _bounded(float(s), text, what)
    pos = 0
    total = 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise InvalidDuration(
            f"{what}: {text!r} is not a duration; use a number with a unit ms, s, m, h or d "
            "(for example 90s, 15m, 24h, 90d)"
        )
    return _bounded(total, text, what)


def _bounded(seconds: float, text: str, what: str) -> dt.timedelta:
    if not 0 <= seconds <= _MAX_SECONDS:
        raise InvalidDuration(f"{what}: {text!r} is longer than 100 years")
    return dt.timedelta(seconds=seconds)


def format_duration(delta: dt.timedelta) -> str:
    """Render a timedelta compactly: ``1d2h``, ``90s``, ``-5m``."""
    secs = int(delta.total_seconds())
    sign = "-" if secs < 0 else ""
    secs = abs(secs)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return sign + ("".join(parts) or "0s")
