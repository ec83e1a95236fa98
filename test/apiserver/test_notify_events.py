"""
Notified, not polled: the agent's CoreDumped Event (posted by the agent's own EventPoster) reaches the
API server through a watch on the (fake) kube-apiserver, and the server re-reads only that incarnation:
a new incarnation becomes one ADDED endpoint, each further core a MODIFIED one. The watch resumes from its
last resourceVersion when the server ends it, lists again on 410 Gone, and nothing in an Event is trusted.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio

from handler.agent.events import EventPoster

from apiserver.registry.autocreate import AutoCreator
from apiserver.registry.endpoints import EndpointRegistry
from apiserver.registry.eventwatch import EventWatch, PendingIncarnations, incarnation_of

from apiserver_harness import T0, new_uid, store_core


DEADLINE = 30.0
AGENT_TOKEN = "agent-token"


def outcome(*, namespace: str, pod: str, uid: str, core_id: str) -> dict[str, Any]:
    """What the handler's outcome record carries once a core is committed (the agent's input for the Event)."""
    return {
        "result": "stored",
        "kept": True,
        "namespace": namespace,
        "pod": pod,
        "podUID": uid,
        "container": "c",
        "coreID": core_id,
        "signal": 11,
        "signalName": "SIGSEGV",
    }


class Notified:
    """The Event watch and its worker, running against the fake kube-apiserver."""

    def __init__(self, registry: EndpointRegistry, root: Path) -> None:
        assert registry.coredata.pods.api_client is not None
        self.creator = AutoCreator(root=root, registry=registry)
        self.pending = PendingIncarnations(handler=self.creator.changed)
        self.watch = EventWatch(api=registry.coredata.pods.api_client, pending=self.pending)
        self.tasks = [asyncio.create_task(self.pending.run()), asyncio.create_task(self.watch.run())]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest_asyncio.fixture
async def notified(cluster_registry: EndpointRegistry, storage_root: Path) -> AsyncIterator[Notified]:
    running = Notified(cluster_registry, storage_root)
    await asyncio.wait_for(running.watch.watching.wait(), DEADLINE)
    try:
        yield running
    finally:
        await running.close()


@pytest_asyncio.fixture
async def poster(fake_kube: Any, tmp_path: Path) -> AsyncIterator[EventPoster]:
    fake_kube.add_token(AGENT_TOKEN, user="system:serviceaccount:coredump-system:coredump-agent")
    agent = EventPoster(
        kubeconfig=str(fake_kube.write_kubeconfig(tmp_path / "agent.kubeconfig", token=AGENT_TOKEN)), node="node-1"
    )
    try:
        yield agent
    finally:
        await agent.close()


async def next_items(registry: EndpointRegistry, *, since: int, count: int) -> list[tuple[str, str, int]]:
    """The next ``count`` watch events after ``since`` as (type, name, coreCount), waited for with a deadline."""
    items: list[tuple[str, str, int]] = []

    async def collect() -> None:
        async for item in registry.watch(namespace=None, resource_version=since, send_initial_events=False):
            assert item.obj is not None
            items.append((item.type, item.obj["metadata"]["name"], item.obj["status"]["coreCount"]))
            if len(items) == count:
                return

    await asyncio.wait_for(collect(), DEADLINE)
    return items


async def wait_until(predicate: Any) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), DEADLINE)


def file_core(root: Path, *, namespace: str, pod: str, uid: str, minute: int) -> str:
    stored = store_core(
        root,
        namespace=namespace,
        pod=pod,
        pod_uid=uid,
        container="c",
        data=b"core %d" % minute,
        when=T0 + datetime.timedelta(minutes=minute),
    )
    return stored.stored.ref.core_id


async def test_each_event_makes_one_added_then_modified_with_the_new_count(
    notified: Notified, poster: EventPoster, cluster_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()
    start = await cluster_registry.store.current_revision()
    core = file_core(storage_root, namespace="shop", pod="cart-0", uid=uid, minute=1)
    await poster.post(outcome(namespace="shop", pod="cart-0", uid=uid, core_id=core))
    assert await next_items(cluster_registry, since=start, count=1) == [("ADDED", "cart-0", 1)]
    after_added = await cluster_registry.store.current_revision()
    core = file_core(storage_root, namespace="shop", pod="cart-0", uid=uid, minute=2)
    await poster.post(outcome(namespace="shop", pod="cart-0", uid=uid, core_id=core))
    assert await next_items(cluster_registry, since=after_added, count=1) == [("MODIFIED", "cart-0", 2)]
    # The server list-watched Events with the agent's reason, cluster-wide; it never walked storage for them.
    assert notified.watch.relists == 1


async def test_untrusted_events_name_nothing_and_other_reasons_are_not_watched(
    notified: Notified, fake_kube: Any, poster: EventPoster, cluster_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()
    file_core(storage_root, namespace="shop", pod="web-1", uid=uid, minute=1)

    async def post(body: dict[str, Any], namespace: str = "shop") -> None:
        context = ssl.create_default_context(cafile=str(fake_kube.ca_file))
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{fake_kube.url}/api/v1/namespaces/{namespace}/events",
                ssl=context,
                data=json.dumps(body),
                headers={"Authorization": f"Bearer {AGENT_TOKEN}", "Content-Type": "application/json"},
            ) as r:
                assert r.status == 201, await r.text()

    def event(*, reason: str = "CoreDumped", **involved: Any) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "x."},
            "reason": reason,
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": "shop",
                "name": "web-1",
                "uid": uid,
                **involved,
            },
        }

    # A pod that has cores but whose Event has another reason: the field selector keeps it out of the watch.
    await post(event(reason="BackOff"))
    for bad in (
        {"name": "../../etc"},
        {"uid": "../x"},
        {"uid": None},
        {"kind": "Node"},
        {"namespace": "other"},
        {"name": "a" * 300},
        {"apiVersion": "apps/v1"},
    ):
        await post(event(**bad))
    start = await cluster_registry.store.current_revision()
    # The one valid Event, last: its endpoint appears, and the hints before it (handled in order) made nothing.
    await post(event(name="web-1", uid=uid))
    assert await next_items(cluster_registry, since=start, count=1) == [("ADDED", "web-1", 1)]
    assert [o["metadata"]["name"] for o in (await cluster_registry.list(namespace=None)).items] == ["web-1"]
    assert all(
        "fieldSelector=reason%3DCoreDumped" in r or "fieldSelector=reason=CoreDumped" in r
        for r in fake_kube.list_requests
        if r.startswith("/api/v1/events")
    )


async def test_the_watch_resumes_where_it_was_and_lists_again_only_after_410(
    notified: Notified, fake_kube: Any, poster: EventPoster, cluster_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()
    core = file_core(storage_root, namespace="shop", pod="db-0", uid=uid, minute=1)
    start = await cluster_registry.store.current_revision()
    await poster.post(outcome(namespace="shop", pod="db-0", uid=uid, core_id=core))
    assert await next_items(cluster_registry, since=start, count=1) == [("ADDED", "db-0", 1)]

    # The API server ends every watch (a restart, a timeout): an Event posted before the watch is back is
    # still seen, because the watch resumes from the last resourceVersion, without a new LIST.
    fake_kube.drop_watches()
    core = file_core(storage_root, namespace="shop", pod="db-0", uid=uid, minute=2)
    since = await cluster_registry.store.current_revision()
    await poster.post(outcome(namespace="shop", pod="db-0", uid=uid, core_id=core))
    assert await next_items(cluster_registry, since=since, count=1) == [("MODIFIED", "db-0", 2)]
    assert notified.watch.relists == 1 and fake_kube.list_count["events"] == 1

    # History compacted past the watch's resourceVersion (other objects changed meanwhile): the resumed watch
    # gets 410 Gone, lists again, and later Events arrive.
    fake_kube.add_namespace("later")
    fake_kube.compact()
    fake_kube.drop_watches()
    await wait_until(lambda: notified.watch.relists == 2 and notified.watch.watching.is_set())
    core = file_core(storage_root, namespace="shop", pod="db-0", uid=uid, minute=3)
    since = await cluster_registry.store.current_revision()
    await poster.post(outcome(namespace="shop", pod="db-0", uid=uid, core_id=core))
    assert await next_items(cluster_registry, since=since, count=1) == [("MODIFIED", "db-0", 3)]


async def test_a_flood_of_hints_costs_bounded_memory_and_each_pod_is_read_once() -> None:
    handled: list[tuple[str, str, str]] = []

    async def handler(*, namespace: str, pod: str, uid: str) -> None:
        handled.append((namespace, pod, uid))

    pending = PendingIncarnations(handler=handler, limit=3)
    for i in range(10):
        pending.add(("ns", f"p{i % 5}", "u"))
    assert len(pending) == 3 and pending.dropped == 4  # p0..p2 kept once each; p3 and p4 dropped, twice each
    task = asyncio.create_task(pending.run())
    try:
        await wait_until(lambda: len(handled) == 3)
    finally:
        task.cancel()
    assert handled == [("ns", "p0", "u"), ("ns", "p1", "u"), ("ns", "p2", "u")]


def test_an_event_names_an_incarnation_only_with_valid_names() -> None:
    good = {
        "reason": "CoreDumped",
        "metadata": {"namespace": "a"},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": "a", "name": "p", "uid": "0a-1"},
    }
    assert incarnation_of(good) == ("a", "p", "0a-1")
    for broken in (
        [],
        {**good, "reason": "Killing"},
        {**good, "involvedObject": "x"},
        {**good, "metadata": None},
        {**good, "involvedObject": {**good["involvedObject"], "uid": 7}},
        {**good, "involvedObject": {**good["involvedObject"], "name": "P/../.."}},
    ):
        assert incarnation_of(broken) is None
