"""
The watch cache (``apiserver.registry.cacher``) on the in-memory store: one store watch for every client,
LIST resourceVersion=0 from memory, 410 below the window, watchers kept open across a store outage (and a
relist after compaction, delivered as the difference), slow watchers closed, selector transitions,
bookmarks and freshness waits. The real-etcd and real-kubectl side is in ``test_watch_cache_etcd.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from apiserver.registry import errors
from apiserver.registry.cacher import CacheEvent, WatchCache
from apiserver.registry.endpoints import KEY_ROOT, EndpointRegistry, key_for, key_of
from apiserver.registry.memory import MemoryStore
from apiserver.registry.store import (
    ListPage,
    ProgressRequests,
    RevisionCompacted,
    StoreEvent,
    StoreUnavailable,
)

DEADLINE = 10.0  # seconds a test waits for something that must happen (never an assertion on time)


class FlakyStore(MemoryStore):
    """A memory store whose watches can be broken and refused (an etcd outage), counting list and watch calls.
    Writes keep working during the "outage": they stand for another replica's writes the cache must catch up on."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.down = False
        self.watch_calls = 0
        self.list_calls = 0
        self._broken = asyncio.Event()

    def break_watches(self) -> None:
        self.down = True
        self._broken.set()

    def heal(self) -> None:
        self.down = False
        self._broken = asyncio.Event()

    async def list(self, prefix: str, **kw: Any) -> ListPage:
        self.list_calls += 1
        if self.down:
            raise StoreUnavailable("etcd is down (test)")
        return await super().list(prefix, **kw)

    async def watch(
        self, prefix: str, *, from_revision: int, progress: ProgressRequests | None = None
    ) -> AsyncIterator[StoreEvent]:
        self.watch_calls += 1
        if self.down:
            raise StoreUnavailable("etcd is down (test)")
        broken = asyncio.ensure_future(self._broken.wait())
        inner = super().watch(prefix, from_revision=from_revision, progress=progress)
        try:
            while True:
                step = asyncio.ensure_future(inner.__anext__())
                await asyncio.wait({step, broken}, return_when=asyncio.FIRST_COMPLETED)
                if broken.done():  # even with an event ready: after the break nothing more is delivered
                    step.cancel()
                    with contextlib.suppress(BaseException):
                        await step
                    raise StoreUnavailable("etcd went away (test)")
                yield step.result()
        except StopAsyncIteration:
            return
        finally:
            broken.cancel()
            await inner.aclose()


def obj(name: str, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "coredump.example.io/v1alpha1",
        "kind": "CoredumpEndpoint",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {},
    }


def everything(_: dict[str, Any]) -> bool:
    return True


@contextlib.asynccontextmanager
async def running_cache(store: MemoryStore, **kw: Any) -> AsyncIterator[WatchCache]:
    cache = WatchCache(store=store, prefix=KEY_ROOT, key_of=key_of, **kw)
    await cache.start()
    task = asyncio.create_task(cache.run())
    try:
        yield cache
    finally:
        await cache.close()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class Watcher:
    """A client watch on the cache, read in the background into a queue."""

    def __init__(self, events: AsyncIterator[CacheEvent]) -> None:
        self.queue: asyncio.Queue[CacheEvent | None] = asyncio.Queue()
        self.ended = asyncio.Event()
        self._events = events
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self._events:
                await self.queue.put(event)
        finally:
            self.ended.set()
            await self.queue.put(None)

    async def next(self) -> CacheEvent:
        event = await asyncio.wait_for(self.queue.get(), DEADLINE)
        assert event is not None, "the watch ended"
        return event

    async def names(self, count: int) -> list[tuple[str, str]]:
        out = []
        for _ in range(count):
            event = await self.next()
            assert event.obj is not None
            out.append((event.type, event.obj["metadata"]["name"]))
        return out

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


def watch(
    cache: WatchCache, *, rv: int | None, namespace: str = "ns", selected: Any = everything, bookmarks: bool = False
) -> Watcher:
    return Watcher(
        cache.watch(
            prefix=f"{KEY_ROOT}{namespace}/",
            selected=selected,
            resource_version=rv,
            initial_events=not rv,
            initial_events_end=False,
            bookmarks=bookmarks,
        )
    )


async def create(store: MemoryStore, name: str, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    return await store.create(key_for(namespace, name), obj(name, namespace, **labels))


async def until(condition: Any) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.01)


async def test_one_store_watch_feeds_every_client_watch() -> None:
    store = FlakyStore()
    await store.start()
    async with running_cache(store) as cache:
        start = await store.current_revision()
        watchers = [watch(cache, rv=start) for _ in range(20)]
        await create(store, "a")
        for watcher in watchers:
            assert await watcher.names(1) == [("ADDED", "a")]
        assert store.watch_calls == 1
        for watcher in watchers:
            await watcher.close()


async def test_list_at_resource_version_0_comes_from_the_cache_and_a_consistent_list_from_the_store() -> None:
    store = FlakyStore()
    await store.start()
    async with running_cache(store) as cache:
        registry = EndpointRegistry(store=store, coredata=None, cache=cache)  # type: ignore[arg-type]
        created = await create(store, "a")
        await until(lambda: cache.revision >= int(created["metadata"]["resourceVersion"]))
        lists = store.list_calls
        cached = await registry.list(namespace="ns", resource_version=0)
        assert [o["metadata"]["name"] for o in cached.items] == ["a"]
        assert cached.items[0]["status"]  # served as read: with a status
        assert store.list_calls == lists
        not_older = await registry.list(namespace="ns", resource_version=int(created["metadata"]["resourceVersion"]))
        assert [o["metadata"]["name"] for o in not_older.items] == ["a"] and store.list_calls == lists
        quorum = await registry.list(namespace="ns")
        assert [o["metadata"]["name"] for o in quorum.items] == ["a"] and store.list_calls == lists + 1
        paged = await registry.list(
            namespace="ns", resource_version=int(created["metadata"]["resourceVersion"]), limit=1
        )
        assert store.list_calls == lists + 2 and len(paged.items) == 1  # a limit with a version: the store
        # The cache's objects are not the caller's to change.
        cached.items[0]["metadata"]["labels"] = {"changed": "yes"}
        cached.items[0]["extra"] = 1
        again = await registry.list(namespace="ns", resource_version=0)
        assert "extra" not in again.items[0]


async def test_a_watch_older_than_the_window_is_too_old_and_one_inside_it_is_replayed() -> None:
    store = MemoryStore()
    await store.start()
    async with running_cache(store, capacity=3) as cache:
        revisions = [int((await create(store, f"o{i}"))["metadata"]["resourceVersion"]) for i in range(5)]
        await until(lambda: cache.revision >= revisions[-1])
        with pytest.raises(RevisionCompacted) as raised:
            async for _ in cache.watch(
                prefix=KEY_ROOT,
                selected=everything,
                resource_version=revisions[0],
                initial_events=False,
                initial_events_end=False,
                bookmarks=False,
            ):
                pass
        assert raised.value.compacted == cache.horizon == revisions[1]
        replay = watch(cache, rv=revisions[1])
        assert await replay.names(3) == [("ADDED", "o2"), ("ADDED", "o3"), ("ADDED", "o4")]
        await replay.close()


async def test_watchers_stay_open_across_a_store_outage_and_get_what_changed_meanwhile() -> None:
    store = FlakyStore()
    await store.start()
    async with running_cache(store) as cache:
        watcher = watch(cache, rv=await store.current_revision())
        await create(store, "before")
        assert await watcher.names(1) == [("ADDED", "before")]
        store.break_watches()
        await until(lambda: store.watch_calls >= 3)  # the cache retried while the store was down
        await create(store, "during")  # another replica wrote while this one could not watch
        store.heal()
        await create(store, "after")
        assert await watcher.names(2) == [("ADDED", "during"), ("ADDED", "after")]
        assert not watcher.ended.is_set()
        await watcher.close()


async def test_a_store_that_compacted_during_the_outage_is_relisted_into_the_difference() -> None:
    store = FlakyStore()
    await store.start()
    async with running_cache(store) as cache:
        await create(store, "kept")
        await create(store, "changed")
        await create(store, "removed")
        labelled = watch(cache, rv=await store.current_revision() - 3)
        assert [n for _, n in await labelled.names(3)] == ["kept", "changed", "removed"]
        store.break_watches()
        changed = await store.get(key_for("ns", "changed"))
        changed["metadata"]["labels"] = {"new": "label"}
        await store.update(key_for("ns", "changed"), changed, expected_revision=None)
        await store.delete(key_for("ns", "removed"))
        await create(store, "added")
        await store.compact(await store.current_revision())  # the cache's revision is gone from history
        lists = store.list_calls
        store.heal()
        events = await labelled.names(3)
        assert sorted(events) == [("ADDED", "added"), ("DELETED", "removed"), ("MODIFIED", "changed")]
        assert store.list_calls == lists + 1  # relisted once
        assert not labelled.ended.is_set()
        await create(store, "later")
        assert await labelled.names(1) == [("ADDED", "later")]
        listed, _ = cache.list(f"{KEY_ROOT}ns/", everything)
        assert [o["metadata"]["name"] for o in listed] == ["added", "changed", "kept", "later"]
        await labelled.close()


async def test_a_watcher_that_falls_out_of_the_window_is_closed_and_the_others_are_not() -> None:
    store = MemoryStore()
    await store.start()
    async with running_cache(store, capacity=5) as cache:
        start = await store.current_revision()
        stuck = cache.watch(
            prefix=KEY_ROOT,
            selected=everything,
            resource_version=start,
            initial_events=False,
            initial_events_end=False,
            bookmarks=False,
        )
        reader = watch(cache, rv=start)
        await create(store, "first")
        first = await stuck.__anext__()  # a client that reads one event, then nothing
        assert first.type == "ADDED" and first.obj is not None and first.obj["metadata"]["name"] == "first"
        assert await reader.names(1) == [("ADDED", "first")]
        names = []
        for i in range(12):
            await create(store, f"o{i}")
            names += [n for _, n in await reader.names(1)]
        assert names == [f"o{i}" for i in range(12)]
        with pytest.raises(StopAsyncIteration):  # its next event has left the window: it ends, never a gap
            await stuck.__anext__()
        await reader.close()


async def test_label_selector_watch_sees_objects_enter_and_leave_the_selection() -> None:
    store = MemoryStore()
    await store.start()
    async with running_cache(store) as cache:

        def selected(o: dict[str, Any]) -> bool:
            return o["metadata"].get("labels", {}).get("team") == "a"

        watcher = watch(cache, rv=await store.current_revision(), selected=selected)
        created = await create(store, "x")
        labelled = {**created, "metadata": {**created["metadata"], "labels": {"team": "a"}}}
        labelled = await store.update(key_for("ns", "x"), labelled, expected_revision=None)
        relabelled = {**labelled, "metadata": {**labelled["metadata"], "labels": {"team": "b"}}}
        relabelled = await store.update(key_for("ns", "x"), relabelled, expected_revision=None)
        first, second = await watcher.next(), await watcher.next()
        assert first.type == "ADDED" and first.obj is not None and first.obj["metadata"]["labels"] == {"team": "a"}
        assert second.type == "DELETED" and second.obj is not None
        assert second.obj["metadata"]["labels"] == {"team": "a"}  # the content it was selected with
        assert second.obj["metadata"]["resourceVersion"] == relabelled["metadata"]["resourceVersion"]
        await watcher.close()


async def test_bookmarks_carry_progress_made_outside_the_watchers_selection() -> None:
    store = MemoryStore()
    await store.start()
    async with running_cache(store, bookmark_interval=0.05) as cache:
        start = await store.current_revision()
        watcher = watch(cache, rv=start, namespace="quiet", bookmarks=True)
        other = await create(store, "elsewhere", namespace="busy")
        event = await watcher.next()
        while event.revision < int(other["metadata"]["resourceVersion"]):
            event = await watcher.next()
        assert event.type == "BOOKMARK" and event.obj is None
        assert event.revision == int(other["metadata"]["resourceVersion"])
        await watcher.close()


async def test_a_list_not_older_than_a_version_waits_for_the_cache_and_a_future_one_is_504() -> None:
    store = MemoryStore()
    await store.start()
    async with running_cache(store, fresh_timeout=0.5) as cache:
        # A write the cache's watch does not see (another resource): only a progress request moves it.
        await store.create("/other/x", {"metadata": {"name": "x"}})
        current = await store.current_revision()
        assert cache.revision < current
        await cache.wait_fresh(current)
        assert cache.revision >= current
        with pytest.raises(errors.ResourceVersionTooLarge) as raised:
            await cache.wait_fresh(current + 100)
        assert raised.value.requested == current + 100 and raised.value.current < current + 100


async def test_a_watch_from_a_version_the_cache_has_not_reached_yet_skips_what_the_client_has() -> None:
    store = FlakyStore()
    await store.start()
    async with running_cache(store) as cache:
        store.break_watches()  # the cache's watch lags (here: stalls) behind the store
        await until(lambda: store.watch_calls >= 2)
        # Written and read back (a quorum read) before the cache had it: the client's version is ahead.
        created = await create(store, "already-listed")
        ahead = int(created["metadata"]["resourceVersion"])
        assert cache.revision < ahead
        watcher = Watcher(
            cache.watch(
                prefix=KEY_ROOT,
                selected=everything,
                resource_version=ahead,
                initial_events=False,
                initial_events_end=False,
                bookmarks=False,
            )
        )
        await asyncio.sleep(0.05)  # the watch is established before the cache catches up
        store.heal()
        await until(lambda: cache.revision >= ahead)
        await create(store, "new")
        assert await watcher.names(1) == [("ADDED", "new")]
        await watcher.close()


async def test_a_cached_list_answers_the_same_bytes_as_encoding_it_and_follows_changes() -> None:
    from apiserver.api import conventions
    from apiserver.api import resource as r
    from apiserver.handlers.endpoints import _joined_list

    store = MemoryStore()
    await store.start()
    async with running_cache(store) as cache:
        registry = EndpointRegistry(store=store, coredata=None, cache=cache)  # type: ignore[arg-type]

        async def both() -> tuple[bytes, bytes]:
            result = await registry.list(namespace="ns", resource_version=0)
            out = conventions.list_object(
                kind=r.LIST_KIND,
                api_version=r.API_VERSION,
                items=result.items,
                resource_version=result.resource_version,
            )
            assert result.encoded is not None
            return _joined_list(out, result.encoded).body, json.dumps(out, separators=(",", ":")).encode()

        await create(store, "a", team="x")
        last = await create(store, "b")
        await until(lambda: cache.revision >= int(last["metadata"]["resourceVersion"]))
        joined, encoded = await both()
        assert joined == encoded
        changed = await store.get(key_for("ns", "a"))
        changed["metadata"]["labels"] = {"team": "y"}
        changed = await store.update(key_for("ns", "a"), changed, expected_revision=None)
        await until(lambda: cache.revision >= int(changed["metadata"]["resourceVersion"]))
        joined, encoded = await both()
        assert joined == encoded and b'"team":"y"' in joined and b'"team":"x"' not in joined
