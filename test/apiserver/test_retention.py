"""
Retention once per cluster: the plan, namespace policies, one elected replica at a time through Leases, the index
from the stored status (no storage walk on the hot path), removals seen by watchers, the slow reconcile's debris
sweep and object collector, and the metrics from the one place.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio import client, config

from apiserver.metrics import REGISTRY
from apiserver.registry import corestatus
from apiserver.registry.autocreate import AutoCreator
from apiserver.registry.coredata import CoreData
from apiserver.registry.endpoints import EndpointRegistry
from apiserver.registry.memory import MemoryStore
from apiserver.registry.statusreconciler import StatusReconciler
from apiserver.retention import setup
from apiserver.retention.index import entries_of
from apiserver.retention.leader import LeaseElector
from apiserver.retention.plan import IndexedCore, plan
from apiserver.retention.policy import Policy, PolicyError, effective, parse_namespace_policy
from apiserver.retention.runner import ConfigMapPolicies, PassReport, Retention
from handler import layout, objects, safefs
from waiting import await_until

UID = "0b5a6c1e-1111-4a2b-9c3d-000000000001"
UID2 = "0b5a6c1e-2222-4a2b-9c3d-000000000002"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def core_id(when: datetime, n: int = 1) -> str:
    return f"{when.strftime('%Y%m%dT%H%M%SZ')}-app-{n}-11"


def put(
    root: Path, *, ns: str, pod: str, age: timedelta, size: int = 100, n: int = 1, uid: str = UID
) -> layout.StoredCore:
    with layout.CoreWriter(
        root, namespace=ns, pod=pod, pod_uid=uid, container="app", core_id=core_id(NOW - age, n)
    ) as w:
        w.write(gzip.compress(b"x" * size))
        stored = w.commit({"size": size, "signal": 11, "signalName": "SIGSEGV"})
    return stored


def ic(ns: str, pod: str, hours: float, size: int = 10, n: int = 0) -> IndexedCore:
    t = (NOW - timedelta(hours=hours)).timestamp()
    return IndexedCore(
        namespace=ns, pod=pod, pod_uid=UID, container="app", core_id=f"c{n}-{hours}", time=t, stored_size=size
    )


def test_plan_applies_age_then_pod_count_then_namespace_bytes_each_core_once() -> None:
    cores = [ic("a", "p", h, n=i) for i, h in enumerate([100, 50, 40, 30, 20, 10])] + [ic("b", "q", 1000, 10**6)]
    policies = {"a": Policy(max_age=60 * 3600, max_cores_per_pod=4, max_bytes=25), "b": Policy()}
    removals = plan(cores, policy_of=policies.__getitem__, now=NOW.timestamp())
    got = [(r.core.core_id, r.reason) for r in removals]
    assert got == [
        ("c0-100", "age"),
        ("c1-50", "pod-count"),
        ("c2-40", "namespace-bytes"),
        ("c3-30", "namespace-bytes"),
    ]
    # b has no limits: its huge old core stays


def test_a_namespace_can_only_be_stricter_than_the_cluster() -> None:
    default = Policy(max_age=30 * 86400, max_bytes=0, max_cores_per_pod=50)
    maximum = Policy(max_age=90 * 86400, max_bytes=100 << 30, max_cores_per_pod=0)
    asked = parse_namespace_policy({"maxAge": "365d", "maxBytes": "1Gi", "maxCoresPerPod": "5"})
    p = effective(default=default, maximum=maximum, asked=asked)
    assert p == Policy(max_age=90 * 86400, max_bytes=1 << 30, max_cores_per_pod=5)
    assert effective(default=default, maximum=maximum, asked={}) == Policy(
        max_age=30 * 86400, max_bytes=100 << 30, max_cores_per_pod=50
    )
    for bad in ({"maxAge": "0"}, {"maxBytes": "lots"}, {"maxCoresPerPod": "-1"}, {"maxage": "1d"}):
        with pytest.raises(PolicyError):
            parse_namespace_policy(bad)


async def _api(fake_kube: Any, tmp_path: Path, name: str) -> client.ApiClient:
    cfg = client.Configuration()
    await config.load_kube_config(
        config_file=str(fake_kube.write_kubeconfig(tmp_path / f"{name}.kubeconfig")), client_configuration=cfg
    )
    return client.ApiClient(configuration=cfg)


async def wait_for(check: Any, *, what: str, timeout: float = 30.0) -> None:
    await await_until(check, what=what, timeout=timeout)


def flags(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    setup.add_retention_flags(parser)
    return parser.parse_args(["--retention-max-age=30d", "--retention-interval=200ms", *extra])


@pytest_asyncio.fixture
async def registry(tmp_path: Path) -> AsyncIterator[EndpointRegistry]:
    """One object store shared by every replica of a test (like their etcd)."""
    store = MemoryStore()
    await store.start()
    coredata = CoreData(storage_root=tmp_path / "storage")
    await coredata.start()
    try:
        yield EndpointRegistry(store=store, coredata=coredata)
    finally:
        await coredata.close()
        await store.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


class Tracked(Retention):
    """The real controller, keeping the report of each pass (what it removed)."""

    reports: list[PassReport]

    async def run_pass(self) -> PassReport:
        report = await super().run_pass()
        self.reports = [*getattr(self, "reports", []), report]
        return report

    @property
    def deleted(self) -> list[str]:
        return [r.core.core_id for rep in getattr(self, "reports", []) for r in rep.removals]


def controller(
    root: Path,
    registry: EndpointRegistry,
    *,
    policies: Any = None,
    args: argparse.Namespace | None = None,
) -> Tracked:
    args = args or flags()
    default, _maximum = setup.policies_from(args)

    async def cluster_defaults(namespaces: Any) -> dict[str, Policy]:
        return {ns: default for ns in namespaces}

    made = setup.controller(args, storage_root=root, registry=registry, policies=policies or cluster_defaults)
    made.__class__ = Tracked
    made.clock = lambda: NOW.timestamp()
    return made  # type: ignore[return-value]


async def learn(registry: EndpointRegistry, root: Path, ns: str, pod: str, uid: str = UID) -> None:
    """The status learns of a core filed behind its back (as the status resync or the Event watch make it)."""
    assert await StatusReconciler(registry=registry, root=root).reconcile(namespace=ns, pod=pod, uid=uid)


async def status_of(registry: EndpointRegistry, ns: str, pod: str) -> dict[str, Any]:
    return (await registry.get(namespace=ns, name=pod))["status"]


class Replica:
    """One API server replica's retention: an elector and the controller, on the shared storage and store."""

    def __init__(
        self, name: str, api: client.ApiClient, root: Path, registry: EndpointRegistry, policies: ConfigMapPolicies
    ) -> None:
        self.elector = LeaseElector(
            api_client=api,
            name="coredump-retention",
            namespace="coredump-system",
            identity=name,
            lease_duration=3,
            renew_deadline=2,
            retry_period=1,
        )
        self.retention = controller(root, registry, policies=policies.policies)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run(self.retention.run))

    async def kill(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_one_replica_enforces_the_other_takes_over_and_namespace_policies_apply_alone(
    fake_kube: Any, tmp_path: Path, root: Path, registry: EndpointRegistry
) -> None:
    old = put(root, ns="team-a", pod="web-0", age=timedelta(days=40))
    young = put(root, ns="team-a", pod="web-0", age=timedelta(days=1), n=2)
    b_cores = [put(root, ns="team-b", pod="db-0", age=timedelta(hours=h), n=h) for h in (1, 2, 3)]
    fake_kube.add_configmap(namespace="team-b", name="coredump-retention", data={"maxCoresPerPod": "2"})
    creator = AutoCreator(root=root, registry=registry)
    await creator.scan()  # the endpoints and their stored status: what retention's index reads
    apis = [await _api(fake_kube, tmp_path, n) for n in ("r1", "r2")]
    try:
        policies = [
            ConfigMapPolicies(
                client.CoreV1Api(a), default=Policy(max_age=30 * 86400), maximum=Policy(max_age=90 * 86400)
            )
            for a in apis
        ]
        r1, r2 = (Replica(n, a, root, registry, p) for n, a, p in zip(("r1", "r2"), apis, policies, strict=True))
        r1.start()
        await wait_for(lambda: r1.elector.leading, what="r1 to lead")
        r2.start()
        await wait_for(lambda: r1.retention.passes >= 2, what="two passes by the leader")
        assert not r2.elector.leading and r2.retention.passes == 0 and r2.retention.full_passes == 0  # idle
        # team-a: the cluster's 30 days; team-b: its own stricter count, which team-a does not get
        assert sorted(r1.retention.deleted) == sorted([old.ref.core_id, b_cores[-1].ref.core_id])
        left = {c.ref.core_id for c in layout.iter_all_cores(root)}
        assert left == {young.ref.core_id, b_cores[0].ref.core_id, b_cores[1].ref.core_id}
        a, b = await status_of(registry, "team-a", "web-0"), await status_of(registry, "team-b", "db-0")
        assert (a["coreCount"], a["lastRemoval"]["reason"]) == (1, "age")
        assert (b["coreCount"], b["lastRemoval"]["reason"]) == (2, "pod-count")
        # the leader dies without giving the lease back; the other takes over within a lease period
        await r1.kill()
        late = put(root, ns="team-a", pod="web-0", age=timedelta(days=31), n=9)
        await learn(registry, root, "team-a", "web-0")
        await wait_for(
            lambda: r2.elector.leading and late.ref.core_id in r2.retention.deleted, what="r2 to take over", timeout=20
        )
        assert late.ref.core_id not in r1.retention.deleted
        assert r2.retention.deleted == [late.ref.core_id]  # nothing deleted twice, nothing else
        assert fake_kube.leases[("coredump-system", "coredump-retention")]["spec"]["holderIdentity"] == "r2"
        await r2.kill()
    finally:
        for api in apis:
            await api.close()


async def test_a_namespace_policy_that_does_not_parse_gives_the_cluster_defaults(
    fake_kube: Any, tmp_path: Path
) -> None:
    fake_kube.add_configmap(namespace="team-a", name="coredump-retention", data={"maxAge": "forever"})
    api = await _api(fake_kube, tmp_path, "r")
    try:
        p = ConfigMapPolicies(client.CoreV1Api(api), default=Policy(max_age=86400), maximum=Policy())
        assert await p.policies(["team-a", "team-c"]) == {
            "team-a": Policy(max_age=86400),
            "team-c": Policy(max_age=86400),
        }
    finally:
        await api.close()


async def test_watchers_see_the_removal_and_a_pod_whose_last_core_went_says_so(
    root: Path, registry: EndpointRegistry
) -> None:
    put(root, ns="team-a", pod="web-0", age=timedelta(days=40))
    keep = put(root, ns="team-a", pod="web-1", age=timedelta(days=1), uid=UID2)
    await AutoCreator(root=root, registry=registry).scan()
    start = await registry.store.current_revision()
    report = await controller(root, registry).run_pass()
    assert [r.reason for r in report.removals] == ["age"]
    events = []
    async for item in registry.watch(namespace="team-a", resource_version=start, send_initial_events=False):
        events.append((item.type, item.obj["metadata"]["name"], item.obj["status"]["coreCount"]))
        break
    assert events == [("MODIFIED", "web-0", 0)]
    gone = await status_of(registry, "team-a", "web-0")
    assert gone["cores"] == [] and gone["lastRemoval"]["reason"] == "age" and gone["lastRemoval"]["cores"] == 1
    assert "lastRemoval" not in await status_of(registry, "team-a", "web-1")  # untouched, not rewritten
    assert [c.ref.core_id for c in layout.iter_all_cores(root)] == [keep.ref.core_id]
    # the record is part of storage, so any replica's resync computes the same status
    assert (await corestatus.read_statuses(root=root, keys=[("team-a", "web-0", UID)]))[
        ("team-a", "web-0", UID)
    ] == gone
    # once the endpoint is deleted too, the slow reconcile removes the record and the emptied directories
    await registry.delete(namespace="team-a", name="web-0")
    await controller(root, registry).full_reconcile()
    assert not (root / "team-a" / "web-0").exists() and (root / "team-a" / "web-1").exists()


async def test_a_pass_reads_the_stored_status_not_the_storage(
    root: Path, registry: EndpointRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(root, ns="team-a", pod="web-0", age=timedelta(days=1))
    await AutoCreator(root=root, registry=registry).scan()
    retention = controller(root, registry)
    unseen = put(root, ns="team-a", pod="web-0", age=timedelta(days=50), n=3)  # status not reconciled yet

    def no_storage(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pass with nothing to remove touched the storage")

    with monkeypatch.context() as m:
        m.setattr(safefs, "open_root", no_storage)
        m.setattr(os, "scandir", no_storage)
        report = await retention.run_pass()
    assert report.removals == [] and not report.ops
    assert unseen.meta_path.exists()  # the index is the status: what it does not list is not planned
    await learn(registry, root, "team-a", "web-0")  # the status learns of it; the next pass acts
    report = await retention.run_pass()
    assert [r.core.core_id for r in report.removals] == [unseen.ref.core_id]
    assert report.ops == {"remove": 1, "record": 1}  # O(changes): one removal, one record, no walk


async def test_cores_no_endpoint_covers_are_found_by_the_slow_reconcile(root: Path, registry: EndpointRegistry) -> None:
    put(root, ns="team-a", pod="web-0", age=timedelta(days=1))
    await AutoCreator(root=root, registry=registry).scan()
    # an earlier incarnation of the same pod name (the endpoint follows the newest one)
    orphan = put(root, ns="team-a", pod="web-0", age=timedelta(days=45), uid=UID2)
    retention = controller(root, registry)
    assert (await retention.run_pass()).removals == []
    full = await retention.full_reconcile()
    assert (full.cores, full.uncovered) == (2, 1)
    report = await retention.run_pass()
    assert [(r.core.pod_uid, r.reason) for r in report.removals] == [(UID2, "age")]
    assert not orphan.meta_path.exists() and not orphan.core_path.exists()
    assert not (root / "team-a" / "web-0" / UID2).exists()  # no endpoint shows it: no record, directories pruned
    assert (await retention.run_pass()).removals == []  # removed once, not planned again


async def test_a_status_that_lists_only_the_newest_cores_is_completed_from_storage(
    root: Path, registry: EndpointRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corestatus, "MAX_CORES_IN_STATUS", 2)
    cores = [put(root, ns="team-a", pod="web-0", age=timedelta(days=d), n=d) for d in (60, 50, 2, 1)]
    await AutoCreator(root=root, registry=registry).scan()
    status = await status_of(registry, "team-a", "web-0")
    assert status["coreCount"] == 4 and len(status["cores"]) == 2
    assert entries_of(("team-a", "web-0", UID), status)[1] is False
    report = await controller(root, registry).run_pass()
    assert sorted(r.core.core_id for r in report.removals) == sorted(c.ref.core_id for c in cores[:2])
    assert report.ops["read"] == 1


async def test_a_removal_never_follows_a_link_planted_in_storage(
    root: Path, registry: EndpointRegistry, tmp_path: Path
) -> None:
    victim_core = put(tmp_path / "elsewhere", ns="team-a", pod="web-0", age=timedelta(days=40))
    put(root, ns="team-a", pod="web-0", age=timedelta(days=2))
    await AutoCreator(root=root, registry=registry).scan()
    # a node replaces the container directory with a link to a tree outside the namespace, and the
    # status (computed earlier) names an old core that is only there
    container = layout.container_dir(root, namespace="team-a", pod="web-0", pod_uid=UID, container="app")
    for f in container.iterdir():
        f.unlink()
    container.rmdir()
    container.symlink_to(victim_core.core_path.parent)
    current = await registry.read_stored(namespace="team-a", name="web-0")
    forged = {**current["status"], "cores": [{**current["status"]["cores"][0], "id": victim_core.ref.core_id}]}
    await registry.write_status(current=current, status=forged)
    report = await controller(root, registry).run_pass()
    assert report.removals == []
    assert victim_core.meta_path.exists() and victim_core.core_path.exists()
    assert (await status_of(registry, "team-a", "web-0"))["coreCount"] == 0  # reconciled: storage is the truth


def stored_object(root: Path, build_id: str, *, age: float) -> Path:
    d = objects.object_dir(root, build_id)
    d.mkdir(parents=True)
    (d / objects.OBJECT_NAME).write_bytes(gzip.compress(b"\x7fELF"))
    (d / objects.INFO_NAME).write_text(json.dumps({"buildID": build_id}))
    when = time.time() - age
    os.utime(d / objects.INFO_NAME, (when, when))
    return d


async def test_objects_no_stored_core_references_are_removed_referenced_and_fresh_ones_kept(
    root: Path, registry: EndpointRegistry
) -> None:
    used, unused, fresh = "aa" + "1" * 38, "bb" + "2" * 38, "cc" + "3" * 38
    for build_id, age in ((used, 7200), (unused, 7200), (fresh, 60)):
        stored_object(root, build_id, age=age)
    core = put(root, ns="team-a", pod="web-0", age=timedelta(days=1))
    layout.amend_metadata(core, {"objects": [{"path": "/app/prog", "buildID": used, "state": "stored-earlier"}]})
    await AutoCreator(root=root, registry=registry).scan()
    retention = controller(root, registry)
    retention.clock = time.time
    full = await retention.full_reconcile()
    assert full.objects == [unused]
    assert objects.is_stored(root, used) and objects.is_stored(root, fresh) and not objects.is_stored(root, unused)
    assert REGISTRY.get_sample_value("coredump_retention_removed_objects_total") >= 1


def test_an_object_claimed_by_a_new_core_while_the_collector_runs_is_kept(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    racing = "dd" + "4" * 38
    stored_object(root, racing, age=7200)
    real_mark = objects._mark
    claimed = []

    def mark_then_claim(head_dir: safefs.Dir, name: str) -> float | None:
        mark = real_mark(head_dir, name)
        if not claimed:  # a handler reuses the object between the collector's look and its rename
            claimed.append(objects.claim(root, racing))
        return mark

    monkeypatch.setattr(objects, "_mark", mark_then_claim)
    assert objects.collect_garbage(root, referenced=set(), now=time.time(), grace=3600) == []
    assert claimed == [True] and objects.is_stored(root, racing)
    monkeypatch.setattr(objects, "_mark", real_mark)
    # claimed, the object is fresh: kept for the grace; after it, with no core referencing it, it goes
    assert objects.collect_garbage(root, referenced=set(), now=time.time() + 7200, grace=3600) == [racing]
    assert not objects.claim(root, racing)  # a handler then stores it anew


async def test_the_debris_sweep_keeps_a_live_writers_temp_file_and_removes_a_dead_ones(
    root: Path, registry: EndpointRegistry
) -> None:
    put(root, ns="team-a", pod="web-0", age=timedelta(days=1))
    stalled = layout.CoreWriter(
        root, namespace="team-a", pod="web-1", pod_uid=UID2, container="app", core_id=core_id(NOW, 5)
    )
    stalled.open()
    stalled.write(gzip.compress(b"half a core"))
    live = stalled.partial()
    assert live is not None and live.exists()
    container = layout.container_dir(root, namespace="team-a", pod="web-0", pod_uid=UID, container="app")
    dead = container / f".{core_id(NOW, 7)}.core.gz.0123abcd.tmp"
    dead.write_bytes(b"left by a writer that died")
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    retention = controller(root, registry, args=flags("--debris-grace=15m"))
    retention.clock = time.time
    full = await retention.full_reconcile()
    assert full.debris == 1 and not dead.exists()
    assert live.exists()  # its writer keeps it fresh (heartbeat): younger than the grace, never swept
    stalled.abort()


async def test_metrics_from_the_one_place(root: Path, registry: EndpointRegistry) -> None:
    put(root, ns="team-m", pod="web-0", age=timedelta(days=40))
    kept = put(root, ns="team-m", pod="web-0", age=timedelta(days=1), n=2)
    await AutoCreator(root=root, registry=registry).scan()
    before = REGISTRY.get_sample_value("coredump_retention_removed_cores_total", {"reason": "age"}) or 0
    passes = REGISTRY.get_sample_value("coredump_retention_pass_duration_seconds_count", {"kind": "pass"}) or 0
    await controller(root, registry).run_pass()
    assert REGISTRY.get_sample_value("coredump_retention_removed_cores_total", {"reason": "age"}) == before + 1
    assert REGISTRY.get_sample_value("coredump_namespace_stored_cores", {"namespace": "team-m"}) == 1
    assert (
        REGISTRY.get_sample_value("coredump_namespace_stored_bytes", {"namespace": "team-m"})
        == kept.metadata["storedSize"]
    )
    assert REGISTRY.get_sample_value("coredump_retention_pass_duration_seconds_count", {"kind": "pass"}) == passes + 1
    assert (
        REGISTRY.get_sample_value(
            "coredump_retention_storage_operations_total", {"kind": "pass", "operation": "remove"}
        )
        >= 1
    )


def test_the_grace_flags_take_durations_and_refuse_what_would_sweep_live_writes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert flags("--debris-grace=30m").debris_grace == 1800
    assert flags().debris_grace == 900 and flags().retention_full_interval == 6 * 3600
    for short in ("0", "1m"):  # under four heartbeats of a live writer
        with pytest.raises(SystemExit):
            flags(f"--debris-grace={short}")
        assert "--debris-grace: a debris grace of" in capsys.readouterr().err
