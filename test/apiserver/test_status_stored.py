"""
Stored status: a further core filed into storage becomes a new resourceVersion and a MODIFIED event
(written by the status reconciler with a resourceVersion precondition); client writes to status are ignored.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from apiserver.registry.autocreate import AutoCreator
from apiserver.registry.endpoints import EndpointRegistry
from apiserver.registry.statusreconciler import StatusReconciler

from apiserver_harness import T0, body, new_uid, store_core


async def test_each_further_core_is_a_modified_event_with_the_new_count(
    dev_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()
    store_core(storage_root, namespace="a", pod="p", pod_uid=uid, container="c", data=b"1", when=T0)
    creator = AutoCreator(root=storage_root, registry=dev_registry)
    start = await dev_registry.store.current_revision()
    await creator.scan()
    first = await dev_registry.get(namespace="a", name="p")
    store_core(
        storage_root,
        namespace="a",
        pod="p",
        pod_uid=uid,
        container="c",
        data=b"2",
        when=T0 + datetime.timedelta(minutes=1),
    )
    assert await dev_registry.get(namespace="a", name="p") == first  # reads do not walk storage
    await creator.scan()
    second = await dev_registry.get(namespace="a", name="p")
    assert second["status"]["coreCount"] == 2
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    events = []
    async for item in dev_registry.watch(namespace="a", resource_version=start, send_initial_events=False):
        events.append((item.type, item.obj["status"]["coreCount"]))
        if len(events) == 2:
            break
    assert events == [("ADDED", 1), ("MODIFIED", 2)]
    # Nothing changed: no write, same resourceVersion.
    assert not await StatusReconciler(registry=dev_registry, root=storage_root).reconcile(
        namespace="a", pod="p", uid=uid
    )
    assert await dev_registry.store.current_revision() == int(second["metadata"]["resourceVersion"])


async def test_client_writes_to_status_through_the_main_resource_are_ignored(
    dev_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()
    store_core(storage_root, namespace="a", pod="q", pod_uid=uid, container="c", data=b"1", when=T0)
    created = (await dev_registry.create(namespace="a", body={**body("q", uid), "status": {"coreCount": 99}})).obj
    assert created["status"]["coreCount"] == 1
    updated = (await dev_registry.update(namespace="a", name="q", body={**created, "status": {"coreCount": 7}})).obj
    assert updated["status"] == created["status"]
    patched = (
        await dev_registry.patch(namespace="a", name="q", apply_patch=lambda cur: {**cur, "status": {"coreCount": 5}})
    ).obj
    assert patched["status"] == created["status"]


async def test_resync_catches_cores_removed_behind_the_servers_back(
    dev_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()
    core = store_core(storage_root, namespace="a", pod="r", pod_uid=uid, container="c", data=b"1", when=T0)
    await dev_registry.create(namespace="a", body=body("r", uid))
    for path in core.stored.ref.directory(storage_root).iterdir():
        path.unlink()
    assert await StatusReconciler(registry=dev_registry, root=storage_root).resync() == 1
    assert (await dev_registry.get(namespace="a", name="r"))["status"]["coreCount"] == 0
