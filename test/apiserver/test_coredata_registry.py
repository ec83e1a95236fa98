"""
Endpoints as pods live and die, through the real EndpointRegistry (in-memory store) and CoreData:
uid from the live pod (kubernetes-asyncio against the fake kube-apiserver over TLS), from storage in
dev mode, 422 naming spec.podUID otherwise; status computed from storage; the delete opt-in; auto-create.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from handler import layout

from apiserver.registry import errors
from apiserver.registry.coredata import DELETE_CORES_ANNOTATION, CoreData
from apiserver.registry.endpoints import EndpointRegistry

from apiserver_harness import T0, body
from apiserver_harness import new_uid, store_core


async def test_live_pod_fills_pod_uid_from_the_cluster(cluster_registry: EndpointRegistry, fake_kube: Any) -> None:
    pod = fake_kube.add_pod(namespace="shop", name="web-0")
    created = (await cluster_registry.create(namespace="shop", body=body("web-0"))).obj
    assert created["spec"]["podUID"] == pod["metadata"]["uid"]
    assert created["status"]["coreCount"] == 0 and created["status"]["cores"] == []


async def test_deleted_pod_with_pod_uid_given_is_accepted_and_shows_its_cores(
    cluster_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()  # no such pod in the cluster any more
    a = store_core(
        storage_root,
        namespace="shop",
        pod="gone-0",
        pod_uid=uid,
        container="app",
        data=b"a" * 5000,
        when=T0,
        pid=1,
        signal=11,
    )
    b = store_core(
        storage_root,
        namespace="shop",
        pod="gone-0",
        pod_uid=uid,
        container="db",
        data=b"b" * 7000,
        when=T0 + datetime.timedelta(minutes=1),
        pid=2,
        signal=6,
    )
    await cluster_registry.create(namespace="shop", body=body("gone-0", uid))
    status = (await cluster_registry.get(namespace="shop", name="gone-0"))["status"]
    assert status["coreCount"] == 2 and status["totalSize"] == 12000
    assert status["storedSize"] == a.stored.metadata["storedSize"] + b.stored.metadata["storedSize"]
    assert status["lastCrash"] == "2026-11-23T10:01:00Z" and status["lastSignal"] == "SIGABRT"
    assert [c["id"] for c in status["cores"]] == [a.core_id, b.core_id]
    assert status["cores"][0] == {
        "id": a.core_id,
        "container": "app",
        "signal": 11,
        "signalName": "SIGSEGV",
        "time": "2026-11-23T10:00:00Z",
        "size": 5000,
        "storedSize": a.stored.metadata["storedSize"],
        "exe": "/usr/bin/crasher",
        "buildID": "0123456789abcdef",
        "truncated": False,
    }


async def test_deleted_pod_without_uid_uses_the_stored_incarnation(
    cluster_registry: EndpointRegistry, storage_root: Path
) -> None:
    uid = new_uid()
    store_core(storage_root, namespace="shop", pod="gone-1", pod_uid=uid, container="app", data=b"x", when=T0)
    created = (await cluster_registry.create(namespace="shop", body=body("gone-1"))).obj
    assert created["spec"]["podUID"] == uid and created["status"]["coreCount"] == 1


async def test_dev_mode_uid_from_storage_or_422(dev_registry: EndpointRegistry, storage_root: Path) -> None:
    uid = new_uid()
    store_core(storage_root, namespace="dev", pod="one", pod_uid=uid, container="app", data=b"x", when=T0)
    assert (await dev_registry.create(namespace="dev", body=body("one"))).obj["spec"]["podUID"] == uid

    with pytest.raises(errors.Invalid) as nothing:
        await dev_registry.create(namespace="dev", body=body("none"))
    assert [cause.field for cause in nothing.value.causes] == ["spec.podUID"]

    uids = [new_uid(), new_uid()]
    for i, u in enumerate(uids):
        store_core(
            storage_root,
            namespace="dev",
            pod="two",
            pod_uid=u,
            container="app",
            data=b"x",
            when=T0 + datetime.timedelta(hours=i),
        )
    with pytest.raises(errors.Invalid) as several:
        await dev_registry.create(namespace="dev", body=body("two"))
    assert "spec.podUID" in several.value.message
    assert all(u in several.value.message for u in uids)


async def test_unreachable_cluster_is_503_not_a_guess(cluster_registry: EndpointRegistry, fake_kube: Any) -> None:
    await fake_kube.close()
    with pytest.raises(errors.Unavailable, match="cannot reach the cluster"):
        await cluster_registry.create(namespace="shop", body=body("web-9"))


async def test_delete_keeps_cores_unless_the_object_opted_in(
    dev_registry: EndpointRegistry, storage_root: Path
) -> None:
    keep, purge = new_uid(), new_uid()
    store_core(storage_root, namespace="ns", pod="keep", pod_uid=keep, container="c", data=b"k", when=T0)
    store_core(storage_root, namespace="ns", pod="purge", pod_uid=purge, container="c", data=b"p", when=T0)
    other = store_core(storage_root, namespace="ns", pod="purge", pod_uid=new_uid(), container="c", data=b"o", when=T0)
    await dev_registry.create(namespace="ns", body=body("keep", keep))
    await dev_registry.create(namespace="ns", body=body("purge", purge, {DELETE_CORES_ANNOTATION: "true"}))
    await dev_registry.delete(namespace="ns", name="keep")
    await dev_registry.delete(namespace="ns", name="purge")
    assert len(layout.list_cores(storage_root, namespace="ns", pod="keep")) == 1
    # Only the endpoint's own incarnation is purged.
    assert [c.ref.pod_uid for c in layout.list_cores(storage_root, namespace="ns", pod="purge")] == [
        other.stored.ref.pod_uid
    ]


async def test_auto_create_lists_every_crashed_pod_once(dev_registry: EndpointRegistry, storage_root: Path) -> None:
    from apiserver.registry.autocreate import AUTO_CREATED_ANNOTATION, AutoCreator

    old, new = new_uid(), new_uid()
    store_core(storage_root, namespace="a", pod="p", pod_uid=old, container="c", data=b"1", when=T0)
    store_core(
        storage_root,
        namespace="a",
        pod="p",
        pod_uid=new,
        container="c",
        data=b"2",
        when=T0 + datetime.timedelta(hours=1),
    )
    store_core(storage_root, namespace="b", pod="q", pod_uid=new_uid(), container="c", data=b"3", when=T0)
    await dev_registry.create(namespace="b", body=body("q", new_uid()))  # has one already: left alone
    creator = AutoCreator(root=storage_root, registry=dev_registry)
    assert await creator.scan() == [("a", "p", new)]  # bound to the newest incarnation
    obj = await dev_registry.get(namespace="a", name="p")
    assert obj["metadata"]["annotations"][AUTO_CREATED_ANNOTATION] == "true" and obj["status"]["coreCount"] == 1
    assert await creator.scan() == []

    # Deleted (cores kept): not re-created until the pod crashes again.
    await dev_registry.delete(namespace="a", name="p")
    assert await creator.scan() == []
    store_core(
        storage_root,
        namespace="a",
        pod="p",
        pod_uid=new,
        container="c",
        data=b"4",
        when=T0 + datetime.timedelta(hours=2),
    )
    assert await creator.scan() == [("a", "p", new)]


async def test_fill_status_of_many_objects_reads_storage_once_per_batch(
    storage_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apiserver.registry import corestatus

    coredata = CoreData(storage_root=storage_root)
    uid = new_uid()
    store_core(storage_root, namespace="ns", pod="p-1", pod_uid=uid, container="c", data=b"x", when=T0)
    objs = [
        {"metadata": {"namespace": "ns", "name": f"p-{i}"}, "spec": {"podUID": uid if i == 1 else new_uid()}}
        for i in range(10_000)
    ]
    calls = []
    real = corestatus._read
    monkeypatch.setattr(corestatus, "_read", lambda root, keys: calls.append(len(keys)) or real(root, keys))
    await coredata.fill_status(objs)
    await coredata.fill_status(objs)  # within the cache time: no storage read
    assert calls == [10_000]
    assert objs[1]["status"]["coreCount"] == 1 and objs[2]["status"]["coreCount"] == 0
    objs[1]["status"]["cores"][0]["id"] = "changed"
    await coredata.fill_status(objs[1:2])
    assert objs[1]["status"]["cores"][0]["id"] != "changed"  # every object gets its own copy


async def test_reads_return_the_stored_status_without_walking_storage(
    dev_registry: EndpointRegistry, storage_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Status is stored: after the scan has written it, get and list never walk storage."""
    from apiserver.registry import corestatus
    from apiserver.registry.autocreate import AutoCreator

    uids = [new_uid() for _ in range(3)]
    for i, uid in enumerate(uids):
        store_core(storage_root, namespace="a", pod=f"p-{i}", pod_uid=uid, container="c", data=b"x", when=T0)
    await dev_registry.create(namespace="a", body=body("p-0", uids[0]))
    cache = dev_registry.coredata.status_cache
    cache.invalidate(namespace="a", pod="p-0")
    calls = []
    real = corestatus._read
    monkeypatch.setattr(corestatus, "_read", lambda root, keys: calls.append(keys) or real(root, keys))
    creator = AutoCreator(root=storage_root, registry=dev_registry, status_cache=cache)
    assert sorted(await creator.scan()) == [("a", "p-1", uids[1]), ("a", "p-2", uids[2])]
    calls.clear()  # the scan's reconciles read each changed incarnation; reads must not
    assert (await dev_registry.get(namespace="a", name="p-2"))["status"]["coreCount"] == 1
    assert [o["status"]["coreCount"] for o in (await dev_registry.list(namespace="a")).items] == [1, 1, 1]
    assert calls == []
