"""Bounded waits on a condition — the one way tests wait for something to happen
(never a bare sleep as synchronisation)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Block until ``condition()`` holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:g}s: {what or condition}")
        time.sleep(0.05)


async def async_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Await until ``condition()`` holds; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout:g}s: {what or condition}")
        await asyncio.sleep(0.01)


async def eventually(
    probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout: float = 15.0
) -> T:
    """Poll ``probe`` until ``check`` accepts its value, and return that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"still {value!r} after {timeout:g}s")
        await asyncio.sleep(0.02)
