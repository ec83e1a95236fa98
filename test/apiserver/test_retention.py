"""Retention once per cluster: the plan, namespace policies, and one elected replica at a time through Leases."""
from __future__ import annotations

import asyncio
import gzip
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from apiserver.retention.leader import LeaseElector
from apiserver.retention.plan import IndexedCore, plan
from apiserver.retention.policy import Policy, PolicyError, effective, parse_namespace_policy
from apiserver.retention.runner import ConfigMapPolicies, Retention, remove_from_storage, storage_index
from handler import layout
from waiting import await_until

UID = "0b5a6c1e-1111-4a2b-9c3d-000000000001"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def core_id(when: datetime, n: int = 1) -> str:
    return f"{when.strftime('%Y%m%dT%H%M%SZ')}-app-{n}-11"


def put(root: Path, *, ns: str, pod: str, age: timedelta, size: int = 100, n: int = 1,
        uid: str = UID) -> layout.StoredCore:
    with layout.CoreWriter(root, namespace=ns, pod=pod, pod_uid=uid, container="app",
                           core_id=core_id(NOW - age, n)) as w:
        w.write(gzip.compress(b"x" * size))
        stored = w.commit({"size": size, "signal": 11, "signalName": "SIGSEGV"})
    return stored


def ic(ns: str, pod: str, hours: float, size: int = 10, n: int = 0) -> IndexedCore:
    t = (NOW - timedelta(hours=hours)).timestamp()
    return IndexedCore(namespace=ns, pod=pod, pod_uid=UID, container="app", core_id=f"c{n}-{hours}", time=t,
                       stored_size=size)


def test_plan_applies_age_then_pod_count_then_namespace_bytes_each_core_once() -> None:
    cores = [ic("a", "p", h, n=i) for i, h in enumerate([100, 50, 40, 30, 20, 10])] + [ic("b", "q", 1000, 10**6)]
    policies = {"a": Policy(max_age=60 * 3600, max_cores_per_pod=4, max_bytes=25), "b": Policy()}
    removals = plan(cores, policy_of=policies.__getitem__, now=NOW.timestamp())
    got = [(r.core.core_id, r.reason) for r in removals]
    assert got == [("c0-100", "age"), ("c1-50", "pod-count"), ("c2-40", "namespace-bytes"), ("c3-30", "namespace-bytes")]
    # b has no limits: its huge old core stays


def test_a_namespace_can_only_be_stricter_than_the_cluster() -> None:
    default = Policy(max_age=30 * 86400, max_bytes=0, max_cores_per_pod=50)
    maximum = Policy(max_age=90 * 86400, max_bytes=100 << 30, max_cores_per_pod=0)
    asked = parse_namespace_policy({"maxAge": "365d", "maxBytes": "1Gi", "maxCoresPerPod": "5"})
    p = effective(default=default, maximum=maximum, asked=asked)
    assert p == Policy(max_age=90 * 86400, max_bytes=1 << 30, max_cores_per_pod=5)
    assert effective(default=default, maximum=maximum, asked={}) == Policy(max_age=30 * 86400,
                                                                           max_bytes=100 << 30, max_cores_per_pod=50)
    for bad in ({"maxAge": "0"}, {"maxBytes": "lots"}, {"maxCoresPerPod": "-1"}, {"maxage": "1d"}):
        with pytest.raises(PolicyError):
            parse_namespace_policy(bad)


async def _api(fake_kube, tmp_path: Path, name: str) -> client.ApiClient:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(fake_kube.write_kubeconfig(tmp_path / f"{name}.kubeconfig")),
                                  client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


async def wait_for(check, *, what: str, timeout: float = 30.0) -> None:
    await await_until(check, what=what, timeout=timeout)


class Replica:
    """One API server replica's retention: an elector and a controller over the shared storage root."""

    def __init__(self, name: str, api: client.ApiClient, root: Path, policies: ConfigMapPolicies) -> None:
        self.name = name
        self.root = root
        self.removed_calls: list[set] = []
        self.deleted: list[str] = []
        self.elector = LeaseElector(api_client=api, name="coredump-retention", namespace="coredump-system",
                                    identity=name, lease_duration=3, renew_deadline=2, retry_period=1)
        self.retention = Retention(index=lambda: asyncio.to_thread(storage_index, root), policies=policies.policies,
                                   remove=self._remove, removed=self._removed, interval=0.2,
                                   clock=lambda: NOW.timestamp())
        self.task: asyncio.Task | None = None

    def _remove(self, core: IndexedCore) -> bool:
        ok = remove_from_storage(self.root, core)
        if ok:
            self.deleted.append(core.core_id)
        return ok

    async def _removed(self, changed: set) -> None:
        self.removed_calls.append(changed)

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run(self.retention.run))

    async def kill(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_one_replica_enforces_the_other_takes_over_and_namespace_policies_apply_alone(
        fake_kube, tmp_path: Path) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    old = put(root, ns="team-a", pod="web-0", age=timedelta(days=40))
    young = put(root, ns="team-a", pod="web-0", age=timedelta(days=1), n=2)
    b_cores = [put(root, ns="team-b", pod="db-0", age=timedelta(hours=h), n=h) for h in (1, 2, 3)]
    fake_kube.add_configmap(namespace="team-b", name="coredump-retention", data={"maxCoresPerPod": "2"})
    apis = [await _api(fake_kube, tmp_path, n) for n in ("r1", "r2")]
    try:
        policies = [ConfigMapPolicies(client.CoreV1Api(a), default=Policy(max_age=30 * 86400),
                                      maximum=Policy(max_age=90 * 86400)) for a in apis]
        r1, r2 = (Replica(n, a, root, p) for n, a, p in zip(("r1", "r2"), apis, policies))
        r1.start()
        await wait_for(lambda: r1.elector.leading, what="r1 to lead")
        r2.start()
        await wait_for(lambda: r1.retention.passes >= 2, what="two passes by the leader")
        assert not r2.elector.leading and r2.retention.passes == 0  # the loser is idle
        # team-a: the cluster's 30 days; team-b: its own stricter count, which team-a does not get
        assert sorted(r1.deleted) == sorted([old.ref.core_id, b_cores[-1].ref.core_id])
        left = {c.ref.core_id for c in layout.iter_all_cores(root)}
        assert left == {young.ref.core_id, b_cores[0].ref.core_id, b_cores[1].ref.core_id}
        assert {("team-a", "web-0", UID), ("team-b", "db-0", UID)} == set().union(*r1.removed_calls)
        # the leader dies without giving the lease back; the other takes over within a lease period
        await r1.kill()
        late = put(root, ns="team-a", pod="web-0", age=timedelta(days=31), n=9)
        await wait_for(lambda: r2.elector.leading and late.ref.core_id in r2.deleted, what="r2 to take over",
                       timeout=20)
        assert late.ref.core_id not in r1.deleted
        assert r2.deleted == [late.ref.core_id]            # nothing deleted twice, nothing else
        assert fake_kube.leases[("coredump-system", "coredump-retention")]["spec"]["holderIdentity"] == "r2"
        await r2.kill()
    finally:
        for a in apis:
            await a.close()


async def test_a_namespace_policy_that_does_not_parse_gives_the_cluster_defaults(fake_kube, tmp_path: Path) -> None:
    fake_kube.add_configmap(namespace="team-a", name="coredump-retention", data={"maxAge": "forever"})
    api = await _api(fake_kube, tmp_path, "r")
    try:
        p = ConfigMapPolicies(client.CoreV1Api(api), default=Policy(max_age=86400), maximum=Policy())
        assert await p.policies(["team-a", "team-c"]) == {"team-a": Policy(max_age=86400),
                                                          "team-c": Policy(max_age=86400)}
    finally:
        await api.close()
