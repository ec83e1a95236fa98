"""
The watch cache: what kube-apiserver's cacher does for one resource, in front of an :class:`ObjectStore`.

Contract:

- **One store watch feeds everything.** :meth:`WatchCache.run` keeps, from a single store watch, a copy of
  every object under ``prefix`` and a window of the latest ``capacity`` changes. Every client watch and every
  LIST the registry decides to serve from the cache (``resourceVersion=0``, or ``NotOlderThan`` a version
  without ``limit``) is answered from memory; the store sees one watch however many clients watch.
- **Revision.** The cache reflects the store at :attr:`WatchCache.revision`: the last change's revision, or a
  newer one a store progress notification vouched for ("every change up to R was delivered").
  :meth:`WatchCache.wait_fresh` waits (asking the store for progress) until it reaches a client's version, and
  answers 504 "Too large resource version" after ``fresh_timeout``, as kube-apiserver does after 3 s.
- **Outages.** When the store watch fails the cache keeps serving what it has and re-watches, with capped
  exponential backoff, from its revision: client watches stay open and get every change made meanwhile once
  the store is back. When the store has compacted past that revision the cache lists again and turns the
  difference into ADDED/MODIFIED/DELETED changes (as a reflector's relist), so watchers still stay open;
  what they see of the outage is its net effect, never a gap.
- **Too old.** A client watch from version ``x`` is served only when every change after ``x`` is still in the
  window (``x >= horizon``); otherwise :class:`RevisionCompacted` (the API's 410 Expired, "too old resource
  version"), exactly as kube-apiserver's watch cache refuses a version older than its window.
- **Slow watchers.** A client watch is a cursor into the shared window, so its backlog costs no memory of
  its own and is bounded by the window. A watcher whose next unread change has left the window has fallen
  too far behind: its watch ends (no error, as kube-apiserver closes a blocked watcher) and the client
  re-watches from the last version it saw (or re-lists on 410).
- **Selectors.** Each watcher's predicate is applied to the new and the previous object, as kube-apiserver
  does: an object that starts matching arrives as ADDED, one that stops matching as DELETED.
- Objects handed out are shared with the cache: callers must not mutate them (copy to change anything).
- :meth:`WatchCache.list_encoded` also returns each object's serialized form, computed once per object version
  and reused by every LIST until the object changes (kube-apiserver's cachingObject does the same): a LIST of
  many objects costs a join, not an encoding of each.

Written here rather than taken from a library: the protocol (resourceVersion windows, 410, bookmarks,
progress requests) is Kubernetes' own and no Python library implements it.
"""

from __future__ import annotations

import builtins
import asyncio
import bisect
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from apiserver.registry import errors
from apiserver.registry.store import (
    EventType,
    ObjectStore,
    ProgressRequests,
    RevisionCompacted,
    StoreError,
    StoreEvent,
)

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1000  # changes kept in the window
DEFAULT_BOOKMARK_INTERVAL = 60.0  # kube-apiserver sends a watcher a bookmark about once a minute
DEFAULT_FRESH_TIMEOUT = 3.0  # kube-apiserver's blockTimeout for a resourceVersion the cache has not reached
PROGRESS_INTERVAL = 5.0  # how often the cache asks the store for progress, so bookmarks advance when idle
PROGRESS_RETRY = 0.1  # while someone waits for freshness
BACKOFF_INITIAL, BACKOFF_CAP = 0.1, 4.0  # re-watch after a store failure

Predicate = Callable[[dict[str, Any]], bool]


@dataclasses.dataclass(frozen=True, slots=True)
class _Change:
    type: EventType  # ADDED, MODIFIED or DELETED
    key: str
    obj: dict[str, Any]  # the new object; for DELETED the last one, at the delete revision
    prev: dict[str, Any] | None  # the object before the change (None for ADDED)
    revision: int


@dataclasses.dataclass(frozen=True, slots=True)
class CacheEvent:
    """What a client watch receives: ADDED, MODIFIED, DELETED with an object, or BOOKMARK without."""

    type: str
    obj: dict[str, Any] | None
    revision: int
    initial_events_end: bool = False


def _at_revision(obj: dict[str, Any], revision: int) -> dict[str, Any]:
    return {**obj, "metadata": {**obj.get("metadata", {}), "resourceVersion": str(revision)}}


def _object_revision(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


class _Backoff:
    """Capped exponential backoff with jitter, so replicas do not hammer a recovering store in step."""

    def __init__(self) -> None:
        self._next = BACKOFF_INITIAL

    def reset(self) -> None:
        self._next = BACKOFF_INITIAL

    def delay(self) -> float:
        delay, self._next = self._next, min(self._next * 2, BACKOFF_CAP)
        return delay * random.uniform(0.8, 1.2)


class WatchCache:
    """
    :param store: the store the cache follows (its one watch) and lists from (start, relist).
    :param prefix: the keys cached, e.g. ``/coredumpendpoints/``.
    :param key_of: an object's store key (for a relist, whose items come without keys).
    :param capacity: changes kept in the window; also how far a watcher may fall behind.
    :param bookmark_interval: seconds between bookmarks to a watcher that asked for them.
    :param fresh_timeout: how long a read waits for the cache to reach its resourceVersion.
    """

    def __init__(
        self,
        *,
        store: ObjectStore,
        prefix: str,
        key_of: Callable[[dict[str, Any]], str],
        capacity: int = DEFAULT_CAPACITY,
        bookmark_interval: float = DEFAULT_BOOKMARK_INTERVAL,
        fresh_timeout: float = DEFAULT_FRESH_TIMEOUT,
    ) -> None:
        if capacity < 1:
            raise ValueError("the watch cache needs a capacity of at least 1")
        if bookmark_interval <= 0 or fresh_timeout <= 0:
            raise ValueError("bookmark_interval and fresh_timeout must be positive")
        self._store = store
        self._prefix = prefix
        self._key_of = key_of
        self._capacity = capacity
        self._bookmark_interval = bookmark_interval
        self._fresh_timeout = fresh_timeout
        self._objects: dict[str, dict[str, Any]] = {}
        self._keys: list[str] = []  # sorted keys of _objects
        self._encoded: dict[str, bytes] = {}  # serialized objects, by key, dropped when the object changes
        self._ring: list[_Change | None] = [None] * capacity
        self._first = 0  # sequence number of the oldest change kept
        self._next = 0  # sequence number the next change gets
        self._revision = 0
        self._horizon = 0  # every change after this revision is in the window
        self._changed = asyncio.Event()
        self._progress = ProgressRequests()
        self._progress_asked = float("-inf")
        self._closed = False
        self._started = False

    # -- what the registry reads ---------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def horizon(self) -> int:
        """The oldest resourceVersion a watch can start from."""
        return self._horizon

    def list(self, prefix: str, selected: Predicate) -> tuple[list[dict[str, Any]], int]:
        """The objects under ``prefix`` that ``selected`` accepts, in key order, and the revision they are at."""
        items: list[dict[str, Any]] = []
        keys, objects = self._keys, self._objects
        for index in range(bisect.bisect_left(keys, prefix), len(keys)):
            key = keys[index]
            if not key.startswith(prefix):
                break
            obj = objects[key]
            if selected(obj):
                items.append(obj)
        return items, self._revision

    def list_encoded(
        self, prefix: str, selected: Predicate, encode: Callable[[dict[str, Any]], bytes]
    ) -> tuple[builtins.list[dict[str, Any]], builtins.list[bytes], int]:
        """:meth:`list`, and each object as ``encode`` serializes it (memoized until the object changes)."""
        items, revision = self.list(prefix, selected)
        cached = self._encoded
        encoded = []
        for obj in items:
            key = self._key_of(obj)
            data = cached.get(key)
            if data is None:
                data = cached[key] = encode(obj)
            encoded.append(data)
        return items, encoded, revision

    async def wait_fresh(self, revision: int) -> None:
        """Return once the cache is at ``revision`` or newer; 504 Too large resource version after the timeout."""
        if self._revision >= revision:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._fresh_timeout
        while self._revision < revision:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                raise errors.ResourceVersionTooLarge(requested=revision, current=self._revision)
            changed = self._changed
            self._ask_progress()
            try:
                async with asyncio.timeout(min(remaining, PROGRESS_RETRY)):
                    await changed.wait()
            except TimeoutError:
                pass

    async def watch(
        self,
        *,
        prefix: str,
        selected: Predicate,
        resource_version: int | None,
        initial_events: bool,
        initial_events_end: bool,
        bookmarks: bool,
    ) -> AsyncIterator[CacheEvent]:
        """
        A client watch. ``initial_events``: first every current object as ADDED (then, with
        ``initial_events_end``, the annotated BOOKMARK); otherwise the changes after ``resource_version``,
        :class:`RevisionCompacted` if the window no longer has them all. Ends when the watcher falls out of
        the window or the cache closes.
        """
        # No await from here until the cursor is set: the snapshot and the cursor are one instant.
        if initial_events:
            initial, start = self.list(prefix, selected)
            cursor = self._next
        else:
            start = resource_version or 0
            if start < self._horizon:
                raise RevisionCompacted(requested=start, compacted=self._horizon)
            initial, cursor = [], self._first_after(start)
        for obj in initial:
            yield CacheEvent(type="ADDED", obj=obj, revision=start)
        if initial_events_end:
            yield CacheEvent(type="BOOKMARK", obj=None, revision=start, initial_events_end=True)
        loop = asyncio.get_running_loop()
        sent = start  # the newest revision the client may believe it is consistent at
        next_bookmark = loop.time() + self._bookmark_interval
        while not self._closed:
            if cursor < self._first:
                logger.info("a watcher fell %d changes behind the watch cache; ending its watch", self._next - cursor)
                return
            if cursor < self._next:
                change = self._ring[cursor % self._capacity]
                cursor += 1
                assert change is not None
                if change.revision <= start:
                    # The client's version came from a quorum read the cache had not caught up with: it
                    # already has this change.
                    continue
                event = self._for_watcher(change, prefix=prefix, selected=selected)
                if event is not None:
                    sent = max(sent, change.revision)
                    yield event
                continue
            # Caught up: this watcher has seen everything that concerns it up to the cache's revision.
            if bookmarks and loop.time() >= next_bookmark:
                next_bookmark = loop.time() + self._bookmark_interval
                if self._revision > sent:
                    sent = self._revision
                    yield CacheEvent(type="BOOKMARK", obj=None, revision=sent)
                continue
            changed = self._changed
            try:
                async with asyncio.timeout(max(0.0, next_bookmark - loop.time()) if bookmarks else None):
                    await changed.wait()
            except TimeoutError:
                pass

    def _first_after(self, revision: int) -> int:
        """The sequence number of the first change in the window newer than ``revision``."""
        low, high = self._first, self._next
        while low < high:  # revisions in the window never decrease
            middle = (low + high) // 2
            change = self._ring[middle % self._capacity]
            assert change is not None
            if change.revision > revision:
                high = middle
            else:
                low = middle + 1
        return low

    @staticmethod
    def _for_watcher(change: _Change, *, prefix: str, selected: Predicate) -> CacheEvent | None:
        """The change as this watcher sees it, or None: kube-apiserver's rules for the old and new object."""
        if not change.key.startswith(prefix):
            return None
        if change.type is EventType.DELETED:
            return (
                CacheEvent(type="DELETED", obj=change.obj, revision=change.revision) if selected(change.obj) else None
            )
        now = selected(change.obj)
        before = change.prev is not None and selected(change.prev)
        if now:
            return CacheEvent(type="MODIFIED" if before else "ADDED", obj=change.obj, revision=change.revision)
        if before:
            assert change.prev is not None
            # No longer selected: gone for this watcher, with the previous content at the change's revision.
            return CacheEvent(type="DELETED", obj=_at_revision(change.prev, change.revision), revision=change.revision)
        return None

    # -- following the store ------------------------------------------------------------------

    async def start(self) -> None:
        """The first list; store errors propagate (the server does not start without its objects)."""
        page = await self._store.list(self._prefix)
        for obj in page.items:
            key = self._key_of(obj)
            self._objects[key] = obj
        self._keys = sorted(self._objects)
        self._revision = self._horizon = page.revision
        self._started = True
        logger.info("watch cache ready", extra={"objects": len(self._objects), "revision": page.revision})

    async def close(self) -> None:
        """End every client watch."""
        self._closed = True
        self._notify()

    async def run(self) -> None:
        """Follow the store until cancelled or closed: re-watch after failures, relist after compaction."""
        if not self._started:
            await self.start()
        backoff = _Backoff()
        relist = False
        failing_since: float | None = None
        progress_task = asyncio.create_task(self._request_progress(), name="watch-cache-progress")
        try:
            while not self._closed:
                try:
                    if relist:
                        await self._relist()
                        relist = False
                    events = self._store.watch(self._prefix, from_revision=self._revision, progress=self._progress)
                    try:
                        async for event in events:
                            if failing_since is not None:
                                logger.info(
                                    "watch cache following the store again",
                                    extra={
                                        "revision": self._revision,
                                        "outage_s": round(asyncio.get_running_loop().time() - failing_since, 1),
                                    },
                                )
                                failing_since = None
                            backoff.reset()
                            self._apply(event)
                    finally:
                        await events.aclose()  # type: ignore[attr-defined]
                    if self._closed:
                        return
                    raise StoreError("the store ended the watch")
                except RevisionCompacted as error:
                    logger.warning(
                        "the store compacted past the watch cache; listing again",
                        extra={"revision": self._revision, "compacted": error.compacted},
                    )
                    relist = True
                except StoreError as error:
                    if self._closed:
                        return
                    if failing_since is None:
                        failing_since = asyncio.get_running_loop().time()
                        logger.warning(
                            "watch cache lost the store; serving what it has and retrying",
                            extra={"revision": self._revision, "error": str(error)},
                        )
                    await asyncio.sleep(backoff.delay())
        finally:
            progress_task.cancel()

    async def _request_progress(self) -> None:
        """Keep the revision moving while nothing changes, so bookmarks tell watchers something new."""
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            self._ask_progress()

    def _ask_progress(self) -> None:
        """One progress request per PROGRESS_RETRY at most, however many readers wait (they share the answer)."""
        now = asyncio.get_running_loop().time()
        if now - self._progress_asked >= PROGRESS_RETRY:
            self._progress_asked = now
            self._progress.request()

    def _apply(self, event: StoreEvent) -> None:
        if event.type is EventType.PROGRESS:
            if event.revision > self._revision:
                self._revision = event.revision
                self._notify()
            return
        prev = self._objects.get(event.key)
        if event.type is EventType.DELETED:
            if prev is None:
                self._revision = max(self._revision, event.revision)
                return  # never cached (cannot happen after a consistent list): nothing to tell anyone
            self._remove(event.key)
            self._append(
                _Change(type=EventType.DELETED, key=event.key, obj=event.obj, prev=prev, revision=event.revision)
            )
        else:
            self._put(event.key, event.obj)
            type_ = EventType.ADDED if prev is None else EventType.MODIFIED
            self._append(_Change(type=type_, key=event.key, obj=event.obj, prev=prev, revision=event.revision))
        self._revision = max(self._revision, event.revision)
        self._notify()

    async def _relist(self) -> None:
        """List again and turn the difference into changes, as a reflector's relist would."""
        page = await self._store.list(self._prefix)
        listed = {self._key_of(obj): obj for obj in page.items}
        changes: list[_Change] = []
        for key, obj in listed.items():
            prev = self._objects.get(key)
            if prev is None:
                changes.append(
                    _Change(type=EventType.ADDED, key=key, obj=obj, prev=None, revision=_object_revision(obj))
                )
            elif prev["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                changes.append(
                    _Change(type=EventType.MODIFIED, key=key, obj=obj, prev=prev, revision=_object_revision(obj))
                )
        changes.sort(key=lambda change: change.revision)  # each changed after the old revision: in order
        for key in self._objects.keys() - listed.keys():
            prev = self._objects[key]
            changes.append(
                _Change(
                    type=EventType.DELETED,
                    key=key,
                    obj=_at_revision(prev, page.revision),
                    prev=prev,
                    revision=page.revision,
                )
            )
        floor = self._revision
        for change in changes:
            if change.revision < floor:  # keep the window ordered even if the store's history was odd
                change = dataclasses.replace(change, revision=floor)
            floor = change.revision
            if change.type is EventType.DELETED:
                self._remove(change.key)
            else:
                self._put(change.key, change.obj)
            self._append(change)
        self._revision = max(self._revision, page.revision)
        logger.info("watch cache relisted", extra={"revision": self._revision, "changes": len(changes)})
        self._notify()

    def _put(self, key: str, obj: dict[str, Any]) -> None:
        if key not in self._objects:
            bisect.insort(self._keys, key)
        self._objects[key] = obj
        self._encoded.pop(key, None)

    def _remove(self, key: str) -> None:
        self._encoded.pop(key, None)
        if self._objects.pop(key, None) is not None:
            del self._keys[bisect.bisect_left(self._keys, key)]

    def _append(self, change: _Change) -> None:
        if self._next - self._first == self._capacity:
            evicted = self._ring[self._first % self._capacity]
            assert evicted is not None
            self._horizon = max(self._horizon, evicted.revision)
            self._first += 1
        self._ring[self._next % self._capacity] = change
        self._next += 1

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
