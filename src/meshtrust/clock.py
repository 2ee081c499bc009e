"""Time, injected.

Only this module reads the wall clock or the monotonic clock. Everything that needs time takes
a :class:`Clock`; tests pass a :class:`FakeClock` and jump hours in microseconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock", "utc"]

utc = dt.UTC


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(utc)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when told to.

    ``sleep()`` parks the caller until :meth:`advance` moves time past its deadline, so a test
    can advance a day and have every sleeper wake in deadline order, with no real waiting.
    :meth:`wait_for_sleepers` lets a test wait until the code under test is asleep before it
    advances, which removes the race between "start the loop" and "move the clock".
    """

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2030, 1, 1, tzinfo=utc)
        self._mono = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Event()

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._mono + max(0.0, seconds), fut)
        self._sleepers.append(entry)
        self._changed.set()
        try:
            await fut
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)
            self._changed.set()

    @property
    def sleepers(self) -> int:
        return sum(1 for _, f in self._sleepers if not f.done())

    async def wait_for_sleepers(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait (real time, bounded) until at least ``count`` tasks sleep on this clock."""
        async with asyncio.timeout(timeout):
            while self.sleepers < count:
                self._changed.clear()
                await self._changed.wait()

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order.

        After waking one, let it run until it sleeps on this clock again (or finishes), so
        a loop that sleeps repeatedly sees every one of its deadlines inside the interval.
        """
        target = self._mono + seconds
        while True:
            due = sorted(
                (e for e in self._sleepers if e[0] <= target and not e[1].done()),
                key=lambda e: e[0],
            )
            if not due:
                break
            deadline, fut = due[0]
            asleep = self.sleepers
            self._set(deadline)
            fut.set_result(None)
            await self._settle(asleep)
        self._set(target)

    async def _settle(self, asleep: int, max_spins: int = 1000) -> None:
        # The woken task's work is in-memory in tests; a bounded number of loop turns lets
        # it reach its next sleep. A task that ends instead simply leaves one sleeper fewer.
        for _ in range(max_spins):
            await asyncio.sleep(0)
            if self.sleepers >= asleep:
                return

    def _set(self, mono: float) -> None:
        delta = mono - self._mono
        if delta > 0:
            self._mono = mono
            self._now = self._now + dt.timedelta(seconds=delta)
