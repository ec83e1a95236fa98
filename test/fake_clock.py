"""
A fake clock for the server's periodic loops (certificate reload, authentication refresh): the loop is given
:meth:`FakeClock.sleep` instead of ``asyncio.sleep``, and the test moves time with :meth:`FakeClock.advance`,
which returns once the loop has done its work for that time and is asleep again. No test waits for real time.
"""

from __future__ import annotations

import asyncio

from waiting import await_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0  # calls of sleep() so far: a loop asleep again has called it once more
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.now + seconds, future))
        self.sleeps += 1
        await future

    async def asleep(self, *, count: int = 1) -> None:
        """Until the loop has called sleep() ``count`` times in all (it started and reached its first wait)."""
        await await_until(lambda: self.sleeps >= count, what=f"{count} sleeps of the loop")

    async def advance(self, seconds: float) -> None:
        """Move time on, wake the sleepers that are due, and return when each is asleep again."""
        self.now += seconds
        due = [(when, future) for when, future in self._waiters if when <= self.now]
        self._waiters = [(when, future) for when, future in self._waiters if when > self.now]
        before = self.sleeps
        for _, future in due:
            if not future.done():
                future.set_result(None)
        if due:
            await await_until(lambda: self.sleeps >= before + len(due), what="the loop to sleep again")
