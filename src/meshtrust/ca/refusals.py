"""Logging refusals without letting a flood of bad requests fill the log.

Every refused request is worth a line -- until a misbehaving or hostile client sends
thousands a second. :class:`RefusalThrottle` is the pure rule: at most ``burst`` lines per
``window`` seconds; the rest are counted, and the first line of the next window says how
many were left out. :class:`RefusalLog` applies it to a logger with the injected clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from meshtrust.clock import Clock

__all__ = ["RefusalLog", "RefusalThrottle"]


@dataclass
class RefusalThrottle:
    """At most ``burst`` refusal lines per ``window`` seconds (monotonic time)."""

    burst: int = 20
    window: float = 10.0
    _window_start: float | None = None
    _logged: int = 0
    _suppressed: int = 0

    def admit(self, now: float) -> tuple[bool, int]:
        """Whether to log the refusal seen at ``now``, and how many refusals went unlogged
        before it (to say so in its line; 0 when none did or when it is not logged)."""
        reported = 0
        if self._window_start is None or now - self._window_start >= self.window:
            reported, self._suppressed = self._suppressed, 0
            self._window_start, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            return True, reported
        self._suppressed += 1
        return False, 0


class RefusalLog:
    """``warning()`` for refusals, through a :class:`RefusalThrottle`."""

    def __init__(
        self, logger: logging.Logger, clock: Clock, throttle: RefusalThrottle | None = None
    ) -> None:
        self._log = logger
        self._clock = clock
        self._throttle = throttle or RefusalThrottle()

    def warning(self, message: str, *args: object) -> None:
        self._emit(logging.WARNING, message, args)

    def error(self, message: str, *args: object) -> None:
        """The same throttle for errors that come once per request (a full ledger disk
        fails every request: one line each would fill the log disk too)."""
        self._emit(logging.ERROR, message, args)

    def _emit(self, level: int, message: str, args: tuple[object, ...]) -> None:
        admit, suppressed = self._throttle.admit(self._clock.monotonic())
        if not admit:
            return
        if suppressed:
            window = self._throttle.window
            message += f" ({suppressed} more like it in the last {window:g}s were not logged)"
        self._log.log(level, message, *args)
