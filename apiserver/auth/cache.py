"""
A small TTL cache for webhook answers (TokenReview, SubjectAccessReview), bounded like client-go's LRU.

Entries expire after the TTL given when they were stored; the clock is injectable so tests can move
time instead of sleeping.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TTLCache(Generic[V]):
    def __init__(self, *, max_entries: int = 4096, clock: Callable[[], float] | None = None) -> None:
        self._entries: collections.OrderedDict[Hashable, tuple[float, V]] = collections.OrderedDict()
        self._max_entries = max_entries
        self._clock = clock or time.monotonic

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V, *, ttl: float) -> None:
        if ttl <= 0:
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
