"""
One suite for both object stores (in-memory and a real etcd): the same errors, revisions and watch
semantics, which is what lets the registry and every API test run on either backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import pytest
from fake_kube import TestCA
from fixtures_etcd import EtcdServer, EtcdTLS, etcd_in_temp_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apiserver.registry.etcd import EtcdStore, parse_endpoints
from etcd_launcher import free_port
from apiserver.registry.memory import MemoryStore
from apiserver.registry.store import (
    EventType,
    KeyExists,
    KeyNotFound,
    ObjectStore,
    RevisionCompacted,
    RevisionConflict,
    StoreError,
    StoreEvent,
    StoreUnavailable,
)
from waiting import await_until

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Guards against a hang only: each of these operations takes milliseconds when it works.
HANG_GUARD = 15.0


def endpoint(name: str, *, namespace: str = "ns", pod_uid: str = "uid-1", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "coredump.example.io/v1alpha1",
        "kind": "CoredumpEndpoint",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"podUID": pod_uid},
    }


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def without_rv(obj: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(obj))
    copy["metadata"].pop("resourceVersion", None)
    return copy


async def guarded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, HANG_GUARD)


async def take(events: AsyncIterator[StoreEvent], count: int) -> list[StoreEvent]:
    taken: list[StoreEvent] = []

    async def run() -> None:
        async for event in events:
            taken.append(event)
            if len(taken) == count:
                return

    await guarded(run())
    return taken


@pytest.fixture(params=["memory", "etcd"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., ObjectStore]:
    """Builds stores of one backend; two etcd stores made by it share the same etcd and prefix."""
    if request.param == "memory":
        return MemoryStore
    server = request.getfixturevalue("etcd_server")
    prefix = request.getfixturevalue("etcd_prefix")
    return lambda **kwargs: EtcdStore(endpoints=[server.endpoint], prefix=prefix, **kwargs)


@pytest.fixture
async def store(make_store: Callable[..., ObjectStore]) -> AsyncIterator[ObjectStore]:
    backend = make_store()
    await guarded(backend.start())
    yield backend
    await backend.close()


@pytest.fixture
async def etcd_store(etcd_server: Any, etcd_prefix: str) -> AsyncIterator[EtcdStore]:
    backend = EtcdStore(endpoints=[etcd_server.endpoint], prefix=etcd_prefix)
    await guarded(backend.start())
    yield backend
    await backend.close()


# -- CRUD ----------------------------------------------------------------------------------------


async def test_create_then_get_returns_the_object_with_its_revision(store: ObjectStore) -> None:
    before = await store.current_revision()
    given_obj = endpoint("a", app="x")
    given_obj["metadata"]["resourceVersion"] = "999999"  # the store owns it: ignored on write

    created = await store.create("/cde/ns/a", given_obj)

    assert rv(created) > before
    assert rv(created) == await store.current_revision()
    assert without_rv(created) == without_rv(given_obj)
    assert given_obj["metadata"]["resourceVersion"] == "999999", "the caller's dict must not be changed"
    fetched = await store.get("/cde/ns/a")
    assert fetched == created


async def test_objects_returned_are_copies(store: ObjectStore) -> None:
    created = await store.create("/cde/ns/a", endpoint("a"))
    created["spec"]["podUID"] = "changed"
    fetched = await store.get("/cde/ns/a")
    fetched["metadata"]["labels"]["x"] = "y"
    page = await store.list("/cde/")
    page.items[0]["spec"]["podUID"] = "changed too"

    again = await store.get("/cde/ns/a")
    assert again["spec"]["podUID"] == "uid-1"
    assert again["metadata"]["labels"] == {}


async def test_create_of_a_taken_key_is_key_exists(store: ObjectStore) -> None:
    first = await store.create("/cde/ns/a", endpoint("a"))
    with pytest.raises(KeyExists):
        await store.create("/cde/ns/a", endpoint("a", pod_uid="other"))
    assert await store.get("/cde/ns/a") == first


async def test_missing_key_is_key_not_found_for_every_operation(store: ObjectStore) -> None:
    with pytest.raises(KeyNotFound):
        await store.get("/cde/ns/missing")
    with pytest.raises(KeyNotFound):
        await store.update("/cde/ns/missing", endpoint("missing"), expected_revision=None)
    with pytest.raises(KeyNotFound):
        await store.update("/cde/ns/missing", endpoint("missing"), expected_revision=5)
    with pytest.raises(KeyNotFound):
        await store.delete("/cde/ns/missing")
    with pytest.raises(KeyNotFound):
        await store.delete("/cde/ns/missing", expected_revision=5)
    # and nothing was written by the failed calls
    assert (await store.list("/cde/")).items == []


async def test_update_is_a_compare_and_swap_on_the_revision(store: ObjectStore) -> None:
    created = await store.create("/cde/ns/a", endpoint("a"))

    updated = await store.update("/cde/ns/a", endpoint("a", pod_uid="u2"), expected_revision=rv(created))
    assert rv(updated) > rv(created)
    assert updated["spec"]["podUID"] == "u2"

    with pytest.raises(RevisionConflict) as conflict:
        await store.update("/cde/ns/a", endpoint("a", pod_uid="lost"), expected_revision=rv(created))
    assert conflict.value.current == updated, "a conflict reports the current object"
    assert await store.get("/cde/ns/a") == updated

    forced = await store.update("/cde/ns/a", endpoint("a", pod_uid="u3"), expected_revision=None)
    assert rv(forced) > rv(updated)
    assert (await store.get("/cde/ns/a"))["spec"]["podUID"] == "u3"


async def test_delete_returns_the_last_object_at_the_delete_revision(store: ObjectStore) -> None:
    created = await store.create("/cde/ns/a", endpoint("a"))
    updated = await store.update("/cde/ns/a", endpoint("a", pod_uid="u2"), expected_revision=None)

    with pytest.raises(RevisionConflict) as conflict:
        await store.delete("/cde/ns/a", expected_revision=rv(created))
    assert conflict.value.current == updated
    assert await store.get("/cde/ns/a") == updated

    deleted = await store.delete("/cde/ns/a", expected_revision=rv(updated))
    assert without_rv(deleted) == without_rv(updated)
    assert rv(deleted) > rv(updated)
    assert rv(deleted) == await store.current_revision()
    with pytest.raises(KeyNotFound):
        await store.get("/cde/ns/a")
    recreated = await store.create("/cde/ns/a", endpoint("a", pod_uid="u3"))
    assert rv(recreated) > rv(deleted)


async def test_revisions_are_one_monotonic_counter_equal_to_resource_versions(store: ObjectStore) -> None:
    seen = [await store.current_revision()]
    seen.append(rv(await store.create("/cde/ns/a", endpoint("a"))))
    seen.append(rv(await store.create("/cde/other/b", endpoint("b", namespace="other"))))
    seen.append(rv(await store.update("/cde/ns/a", endpoint("a", pod_uid="2"), expected_revision=None)))
    seen.append(rv(await store.delete("/cde/other/b")))
    seen.append(rv(await store.create("/cde/ns/c", endpoint("c"))))
    assert seen == sorted(set(seen)), f"strictly increasing across keys: {seen}"
    assert seen[-1] == await store.current_revision()
    assert [rv(item) for item in (await store.list("/cde/")).items] == [seen[3], seen[5]]


async def test_bad_keys_are_rejected_alike(store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        await store.create("cde/ns/a", endpoint("a"))
    with pytest.raises(ValueError):
        await store.list("cde/")


# -- list ----------------------------------------------------------------------------------------


async def test_list_is_sorted_and_bounded_by_the_prefix(store: ObjectStore) -> None:
    for key in ["/cde/ns/b", "/cde/ns/a", "/cde/ns2/a", "/cde/n/z", "/other/ns/a"]:
        await store.create(key, endpoint(key.rsplit("/", 1)[1]))

    page = await store.list("/cde/ns/")
    assert [item["metadata"]["name"] for item in page.items] == ["a", "b"]
    assert page.continue_key is None
    assert page.revision == await store.current_revision()

    everything = await store.list("")
    assert len(everything.items) == 5
    assert len((await store.list("/cde/")).items) == 4


async def test_empty_list_reports_the_current_revision(store: ObjectStore) -> None:
    await store.create("/cde/ns/a", endpoint("a"))
    page = await store.list("/cde/none/")
    assert page.items == [] and page.continue_key is None
    assert page.revision == await store.current_revision()


async def test_list_pages_read_one_consistent_snapshot(store: ObjectStore) -> None:
    names = [f"p{i}" for i in range(5)]
    originals = {name: await store.create(f"/cde/ns/{name}", endpoint(name)) for name in names}

    first = await store.list("/cde/ns/", limit=2)
    assert [item["metadata"]["name"] for item in first.items] == ["p0", "p1"]
    assert first.continue_key == "/cde/ns/p1"
    snapshot = first.revision

    # Changes after the first page must not show in the following ones.
    await store.update("/cde/ns/p2", endpoint("p2", pod_uid="new"), expected_revision=None)
    await store.delete("/cde/ns/p3")
    await store.create("/cde/ns/p3a", endpoint("p3a"))

    second = await store.list("/cde/ns/", limit=2, start_after=first.continue_key, revision=snapshot)
    assert second.items == [originals["p2"], originals["p3"]]
    assert second.revision == snapshot
    third = await store.list("/cde/ns/", limit=2, start_after=second.continue_key, revision=snapshot)
    assert third.items == [originals["p4"]]
    assert third.continue_key is None

    now = await store.list("/cde/ns/")
    assert [item["metadata"]["name"] for item in now.items] == ["p0", "p1", "p2", "p3a", "p4"]
    assert now.items[2]["spec"]["podUID"] == "new"


async def test_list_with_a_limit_of_exactly_the_rest_has_no_continue(store: ObjectStore) -> None:
    for name in ["a", "b"]:
        await store.create(f"/cde/ns/{name}", endpoint(name))
    page = await store.list("/cde/ns/", limit=2)
    assert len(page.items) == 2
    assert page.continue_key is None


async def test_list_at_a_compacted_revision_is_revision_compacted(store: ObjectStore) -> None:
    await store.create("/cde/ns/a", endpoint("a"))
    old = await store.current_revision()
    await store.update("/cde/ns/a", endpoint("a", pod_uid="2"), expected_revision=None)
    newest = rv(await store.create("/cde/ns/b", endpoint("b")))

    await store.compact(newest)

    with pytest.raises(RevisionCompacted) as compacted:
        await store.list("/cde/ns/", revision=old)
    assert compacted.value.requested == old
    assert compacted.value.compacted == newest
    # the compact revision itself is still readable, as in etcd
    assert len((await store.list("/cde/ns/", revision=newest)).items) == 2
    await store.compact(old)  # compacting again below it is a no-op, not an error


async def test_list_at_a_future_revision_is_an_error(store: ObjectStore) -> None:
    current = await store.current_revision()
    with pytest.raises(StoreError):
        await store.list("/cde/", revision=current + 100)


# -- watch ---------------------------------------------------------------------------------------


async def test_watch_sees_exactly_the_later_events_in_order(store: ObjectStore) -> None:
    await store.create("/cde/ns/before", endpoint("before"))
    start = await store.current_revision()

    added = await store.create("/cde/ns/a", endpoint("a"))
    await store.create("/cde/elsewhere/x", endpoint("x"))  # outside the watched prefix
    modified = await store.update("/cde/ns/a", endpoint("a", pod_uid="2"), expected_revision=rv(added))
    deleted = await store.delete("/cde/ns/a")

    async with contextlib.aclosing(store.watch("/cde/ns/", from_revision=start)) as events:
        seen = await take(events, 3)
        assert [(event.type, event.key, event.revision) for event in seen] == [
            (EventType.ADDED, "/cde/ns/a", rv(added)),
            (EventType.MODIFIED, "/cde/ns/a", rv(modified)),
            (EventType.DELETED, "/cde/ns/a", rv(deleted)),
        ]
        assert seen[0].obj == added
        assert seen[1].obj == modified
        assert seen[2].obj == deleted, "DELETED carries the last object at the delete revision"

        # Nothing else is pending: the next event is the next write.
        marker = await store.create("/cde/ns/marker", endpoint("marker"))
        [after] = await take(events, 1)
        assert (after.type, after.revision, after.obj) == (EventType.ADDED, rv(marker), marker)


async def test_watch_from_now_gets_live_events(store: ObjectStore) -> None:
    start = await store.current_revision()
    async with contextlib.aclosing(store.watch("/cde/", from_revision=start)) as events:
        pending = asyncio.ensure_future(take(events, 2))
        await asyncio.sleep(0.05)  # let the watch reach the backend first (not needed for correctness)
        created = await store.create("/cde/ns/a", endpoint("a"))
        updated = await store.update("/cde/ns/a", endpoint("a", pod_uid="2"), expected_revision=None)
        seen = await pending
    assert [event.obj for event in seen] == [created, updated]


async def test_watch_from_a_compacted_revision_is_revision_compacted(store: ObjectStore) -> None:
    start = await store.current_revision()
    for i in range(3):
        await store.create(f"/cde/ns/{i}", endpoint(str(i)))
    newest = await store.current_revision()
    await store.compact(newest)

    with pytest.raises(RevisionCompacted) as compacted:
        async with contextlib.aclosing(store.watch("/cde/", from_revision=start)) as events:
            await take(events, 1)
    assert compacted.value.compacted == newest

    # Watching from just before the compact revision still works (it starts at the compact revision).
    async with contextlib.aclosing(store.watch("/cde/", from_revision=newest - 1)) as events:
        [event] = await take(events, 1)
    assert (event.key, event.revision) == ("/cde/ns/2", newest)


async def test_close_ends_open_watches(make_store: Callable[..., ObjectStore]) -> None:
    backend = make_store()
    await backend.start()
    start = await backend.current_revision()
    events = backend.watch("/cde/", from_revision=start)
    created = await backend.create("/cde/ns/a", endpoint("a"))
    first = await guarded(anext(events))
    assert first.obj == created

    pending = asyncio.ensure_future(take(events, 1))
    await asyncio.sleep(0.05)  # the watcher is now waiting for the next event
    await backend.close()
    assert await guarded(pending) == [], "the watch ends without an error when the store closes"
    with pytest.raises(StoreUnavailable):
        await backend.get("/cde/ns/a")


# -- in-memory specifics -------------------------------------------------------------------------


async def test_memory_slow_watcher_is_ended_without_holding_up_the_others() -> None:
    backend = MemoryStore(watch_queue_size=8)
    await backend.start()
    start = await backend.current_revision()
    slow = backend.watch("/cde/", from_revision=start)
    fast = backend.watch("/cde/", from_revision=start)
    await backend.create("/cde/ns/0", endpoint("0"))
    assert (await anext(slow)).key == "/cde/ns/0"  # both are registered now
    assert (await anext(fast)).key == "/cde/ns/0"

    fast_seen: list[StoreEvent] = []
    reader = asyncio.ensure_future(take(fast, 40))
    for i in range(1, 41):
        await backend.create(f"/cde/ns/{i}", endpoint(str(i)))
        await asyncio.sleep(0)  # the fast reader keeps up; the slow one never reads
    fast_seen = await reader

    assert [event.key for event in fast_seen] == [f"/cde/ns/{i}" for i in range(1, 41)]
    with pytest.raises(RevisionCompacted) as ended:
        await guarded(anext(slow))
    assert ended.value.requested == start + 1, "it tells the last revision the watcher saw"
    await fast.aclose()
    await backend.close()


async def test_memory_fans_out_to_many_watchers() -> None:
    backend = MemoryStore()
    await backend.start()
    start = await backend.current_revision()
    watches = [backend.watch("/cde/", from_revision=start) for _ in range(100)]
    readers = [asyncio.ensure_future(take(watch, 1)) for watch in watches]
    await asyncio.sleep(0)
    created = await backend.create("/cde/ns/a", endpoint("a"))
    results = await guarded(asyncio.gather(*readers))
    assert all(seen == [StoreEvent(EventType.ADDED, "/cde/ns/a", created, rv(created))] for seen in results)
    results[0][0].obj["spec"]["podUID"] = "mutated"
    assert results[1][0].obj["spec"]["podUID"] == "uid-1", "each watcher gets its own copy"
    await backend.close()


async def test_memory_history_limit_compacts_the_oldest_revisions() -> None:
    backend = MemoryStore(history_limit=5)
    await backend.start()
    start = await backend.current_revision()
    for i in range(10):
        await backend.create(f"/cde/ns/{i}", endpoint(str(i)))
    newest = await backend.current_revision()

    with pytest.raises(RevisionCompacted):
        await backend.list("/cde/", revision=start + 1)
    with pytest.raises(RevisionCompacted):
        async with contextlib.aclosing(backend.watch("/cde/", from_revision=start)) as events:
            await take(events, 1)
    # the last five revisions are still there, for watches and for lists
    async with contextlib.aclosing(backend.watch("/cde/", from_revision=newest - 5)) as events:
        assert [event.revision for event in await take(events, 5)] == list(range(newest - 4, newest + 1))
    assert len((await backend.list("/cde/", revision=newest - 4)).items) == 6


_ops = st.lists(
    st.tuples(st.sampled_from(["create", "update", "delete", "compact"]), st.integers(0, 3)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops, history_limit=st.integers(1, 8))
def test_memory_lists_at_every_kept_revision_match_a_model(ops: list[tuple[str, int]], history_limit: int) -> None:
    """Old versions are pruned on compaction, never the state a kept revision needs."""

    async def run() -> None:
        backend = MemoryStore(history_limit=history_limit)
        await backend.start()
        snapshots = {await backend.current_revision(): {}}
        state: dict[str, dict[str, Any]] = {}
        explicitly_compacted = 0
        for op, n in ops:
            key = f"/k/{n}"
            try:
                if op == "create":
                    state[key] = await backend.create(key, {"metadata": {"name": str(n)}})
                elif op == "update":
                    state[key] = await backend.update(
                        key, {"metadata": {"name": str(n)}, "v": 1}, expected_revision=None
                    )
                elif op == "delete":
                    await backend.delete(key)
                    del state[key]
                else:
                    revision = await backend.current_revision() - n
                    await backend.compact(revision)
                    explicitly_compacted = max(explicitly_compacted, revision)
            except (KeyExists, KeyNotFound):
                pass
            snapshots[await backend.current_revision()] = dict(state)
        current = await backend.current_revision()
        writes = current - 1  # an empty store is at revision 1
        oldest_kept = max(explicitly_compacted, current - history_limit + 1 if writes > history_limit else 0)
        for revision, snapshot in snapshots.items():
            if revision < oldest_kept:
                with pytest.raises(RevisionCompacted):
                    await backend.list("", revision=revision)
                continue
            page = await backend.list("", revision=revision)
            assert page.items == [snapshot[key] for key in sorted(snapshot)], f"at revision {revision}"

    asyncio.run(run())


# -- etcd specifics ------------------------------------------------------------------------------


async def test_etcd_stores_the_json_without_resource_version(
    etcd_server: Any, etcd_prefix: str, etcd_store: EtcdStore
) -> None:
    created = await etcd_store.create("/cde/ns/a", endpoint("a"))
    port = int(etcd_server.endpoint.rsplit(":", 1)[1])
    async with aetcd.Client(host="127.0.0.1", port=port, timeout=5) as client:
        raw = await client.get(f"{etcd_prefix}/cde/ns/a".encode())
    assert raw is not None
    assert raw.mod_revision == rv(created)
    assert json.loads(raw.value) == without_rv(created)
    assert "resourceVersion" not in json.loads(raw.value)["metadata"]


async def test_etcd_two_stores_see_each_others_writes_and_events(
    etcd_server: Any, etcd_prefix: str, etcd_store: EtcdStore
) -> None:
    other = EtcdStore(endpoints=[etcd_server.endpoint], prefix=etcd_prefix)
    await other.start()
    try:
        start = await etcd_store.current_revision()
        async with contextlib.aclosing(other.watch("/cde/", from_revision=start)) as events:
            created = await etcd_store.create("/cde/ns/a", endpoint("a"))
            assert await other.get("/cde/ns/a") == created
            updated = await other.update("/cde/ns/a", endpoint("a", pod_uid="2"), expected_revision=rv(created))
            with pytest.raises(RevisionConflict):
                await etcd_store.update("/cde/ns/a", endpoint("a", pod_uid="3"), expected_revision=rv(created))
            seen = await take(events, 2)
        assert [event.obj for event in seen] == [created, updated]
    finally:
        await other.close()


async def test_etcd_prefixes_isolate_stores(etcd_server: Any, etcd_prefix: str, etcd_store: EtcdStore) -> None:
    sibling = EtcdStore(endpoints=[etcd_server.endpoint], prefix=etcd_prefix + "-sibling")
    await sibling.start()
    try:
        await sibling.create("/cde/ns/a", endpoint("a"))
        assert (await etcd_store.list("")).items == []
        with pytest.raises(KeyNotFound):
            await etcd_store.get("/cde/ns/a")
    finally:
        await sibling.close()


async def test_etcd_unreachable_is_store_unavailable_at_start() -> None:
    backend = EtcdStore(endpoints=[f"http://127.0.0.1:{free_port()}"], dial_timeout=2)
    with pytest.raises(StoreUnavailable) as unavailable:
        await guarded(backend.start())
    assert "cannot reach etcd" in str(unavailable.value)
    assert "\n" not in str(unavailable.value), "one line for the command line"


async def test_etcd_that_never_answers_is_store_unavailable_not_a_hang() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # accept, then say nothing, like a hung etcd

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        backend = EtcdStore(endpoints=[f"http://127.0.0.1:{port}"], dial_timeout=1)
        with pytest.raises(StoreUnavailable) as unavailable:
            await guarded(backend.start())
        assert str(unavailable.value).startswith("cannot reach etcd: ")
        assert connections, "the store did try this endpoint"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_etcd_falls_back_to_the_next_endpoint(etcd_server: Any, etcd_prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert parse_endpoints(f"{dead},{etcd_server.endpoint}") == [dead, etcd_server.endpoint]
    backend = EtcdStore(endpoints=[f"{dead},{etcd_server.endpoint}"], prefix=etcd_prefix)
    await guarded(backend.start())
    try:
        created = await backend.create("/cde/ns/a", endpoint("a"))
        assert await backend.get("/cde/ns/a") == created
    finally:
        await backend.close()


async def test_etcd_restart_is_unavailable_then_recovers_with_data(etcd_server: Any, etcd_store: EtcdStore) -> None:
    created = await etcd_store.create("/cde/ns/a", endpoint("a"))
    events = etcd_store.watch("/cde/", from_revision=rv(created) - 1)
    assert (await guarded(anext(events))).obj == created
    waiting = asyncio.ensure_future(guarded(anext(events)))
    await asyncio.sleep(0.05)

    await asyncio.to_thread(etcd_server.stop)
    try:
        with pytest.raises(StoreUnavailable):
            await guarded(waiting)
        with pytest.raises(StoreUnavailable):
            await guarded(etcd_store.get("/cde/ns/a"))
        with pytest.raises(StoreUnavailable):
            await guarded(etcd_store.create("/cde/ns/b", endpoint("b")))
    finally:
        await asyncio.to_thread(etcd_server.start)

    async def ready() -> bool:
        await etcd_store.check()
        return True

    await await_until(ready, what="the store to reach the restarted etcd", ignore=(StoreUnavailable,), interval=0.1)
    assert await etcd_store.get("/cde/ns/a") == created
    with pytest.raises(KeyNotFound):
        await etcd_store.get("/cde/ns/b")  # the failed create wrote nothing


async def test_memory_forgets_deleted_objects_once_compacted() -> None:
    """A long-running dev server must not grow with every object it ever deleted."""
    backend = MemoryStore(history_limit=10)
    await backend.start()
    for i in range(50):
        await backend.create(f"/cde/ns/{i}", endpoint(str(i)))
        await backend.delete(f"/cde/ns/{i}")
    await backend.create("/cde/ns/kept", endpoint("kept"))
    await backend.compact(await backend.current_revision())
    assert backend._keys == ["/cde/ns/kept"]  # (memory use has no public view)
    assert [item["metadata"]["name"] for item in (await backend.list("")).items] == ["kept"]


# -- etcd over mutual TLS ------------------------------------------------------------------------


def _tls_files(directory: Path) -> EtcdTLS:
    """etcd's CA, serving and client certificates, and a stranger: a client certificate of another CA."""
    ca = TestCA(directory, name="ca")
    server_cert, server_key = ca.issue(cn="server", server=True, stem="server")
    client_cert, client_key = ca.issue(cn="client", stem="client")
    TestCA(directory, name="other-ca").issue(cn="stranger", stem="stranger")
    return EtcdTLS(
        ca_file=ca.cert_file,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
    )


@pytest.fixture(scope="module")
def etcd_tls_server() -> Iterator[EtcdServer]:
    with etcd_in_temp_dir("coredump-etcd-tls-", tls=_tls_files) as server:
        yield server


async def test_etcd_over_mutual_tls(etcd_tls_server: EtcdServer) -> None:
    tls = etcd_tls_server.tls
    assert tls is not None and etcd_tls_server.endpoint.startswith("https://")
    backend = EtcdStore(
        endpoints=[etcd_tls_server.endpoint],
        prefix="/tls-test",
        ca_file=tls.ca_file,
        cert_file=tls.client_cert,
        key_file=tls.client_key,
    )
    await guarded(backend.start())
    try:
        created = await backend.create("/cde/ns/a", endpoint("a"))
        assert await backend.get("/cde/ns/a") == created
        async with contextlib.aclosing(backend.watch("/cde/", from_revision=rv(created) - 1)) as events:
            [event] = await take(events, 1)
        assert event.obj == created
    finally:
        await backend.close()


async def test_etcd_tls_refuses_an_unknown_client_or_server(etcd_tls_server: EtcdServer) -> None:
    tls = etcd_tls_server.tls
    assert tls is not None
    directory = tls.ca_file.parent
    stranger = EtcdStore(
        endpoints=[etcd_tls_server.endpoint],
        ca_file=tls.ca_file,
        cert_file=directory / "stranger.crt",
        key_file=directory / "stranger.key",
        dial_timeout=2,
    )
    with pytest.raises(StoreUnavailable):
        await guarded(stranger.start())
    untrusting = EtcdStore(
        endpoints=[etcd_tls_server.endpoint],
        ca_file=directory / "other-ca.crt",
        cert_file=tls.client_cert,
        key_file=tls.client_key,
        dial_timeout=2,
    )
    with pytest.raises(StoreUnavailable):
        await guarded(untrusting.start())
