"""
The one way tests wait for something to become true: :func:`wait_until` (threads, subprocesses) and
:func:`await_until` (inside the event loop).

A probe is called every ``interval`` seconds until it returns a truthy value, which is returned. After
``timeout`` seconds the wait fails with an ``AssertionError`` that says what was awaited and what the probe
returned (or raised, for the exception types in ``ignore``) the last time, so a failure shows how far it got.
The timeout is a bound on a hang, never a measurement: nothing asserts on how long the wait took.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")


class NotYet:
    """A falsy probe result that still says what was seen (``return NotYet(status)``), for the failure message."""

    def __init__(self, seen: object) -> None:
        self.seen = seen

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return repr(self.seen)


def _failure(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g}s waiting for {what}; last seen: {last!r}")


def wait_until(
    probe: Callable[[], T],
    *,
    what: str,
    timeout: float = 30.0,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """``probe()``'s first truthy value, polled every ``interval`` seconds for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: object = probe()
        except ignore as error:
            last = error
        else:
            if last:
                return cast(T, last)  # a truthy T
        if time.monotonic() >= deadline:
            raise _failure(what, timeout, last)
        time.sleep(interval)


async def await_until(
    probe: Callable[[], T | Awaitable[T]],
    *,
    what: str,
    timeout: float = 30.0,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """As :func:`wait_until`, in the event loop; ``probe`` may be a plain or an async function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            value = probe()
            last: object = await value if inspect.isawaitable(value) else value
        except ignore as error:
            last = error
        else:
            if last:
                return cast(T, last)  # a truthy T
        if loop.time() >= deadline:
            raise _failure(what, timeout, last)
        await asyncio.sleep(interval)
